//! How old the profile is against the agent's code: the commit it was made from
//! (`agent/pgo.source`) and the agent's source files that differ from it now. LLVM drops a
//! changed function's profile without a word (its mismatch warnings are off), so this is
//! what tells a stale profile.

use std::{collections::BTreeSet, fs, path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{cargo, root, stdout_of};

/// The file naming the commit the profile was made from.
fn source_file() -> PathBuf {
    root().join("agent/pgo.source")
}

/// How many changed files are named; the rest are counted.
const NAMED: usize = 5;

/// The profile's commit and the agent's source files changed since.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProfileAge {
    /// The commit the profile was made from; `None` when no file says.
    pub made_from: Option<String>,
    /// The agent's source files (its crate, the workspace crates it builds with, the lock
    /// file) that differ from that commit in the work tree; `None` when they cannot be
    /// compared (no git, or the commit is not in this checkout's history).
    pub changed: Option<Vec<String>>,
}

impl ProfileAge {
    /// The profile's age here and now. A comparison that fails (git or cargo missing, say)
    /// leaves it unknown rather than stopping the caller.
    pub fn current() -> Self {
        let made_from = fs::read_to_string(source_file())
            .ok()
            .and_then(|text| commit_of(&text));
        let changed = made_from.as_deref().and_then(|commit| {
            changed_since(commit).unwrap_or_else(|e| {
                println!("== note: cannot compare the agent's sources with the profile's: {e:#}");
                None
            })
        });
        Self { made_from, changed }
    }

    /// Whether the agent's sources are those the profile was made from.
    pub fn is_current(&self) -> bool {
        self.changed.as_ref().is_some_and(Vec::is_empty)
    }

    /// Whether some of the agent's sources are known to have changed since.
    pub fn is_stale(&self) -> bool {
        self.changed
            .as_ref()
            .is_some_and(|changed| !changed.is_empty())
    }
}

impl std::fmt::Display for ProfileAge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(commit) = &self.made_from else {
            return f.write_str(
                "agent/pgo.source does not say which commit the profile was made from: whether \
                 the agent's code changed since is unknown (make it again with `cargo xtask pgo`)",
            );
        };
        let short = &commit[..commit.len().min(10)];
        match &self.changed {
            None => write!(
                f,
                "the profile was made from commit {short}, which cannot be compared with this \
                 checkout: whether the agent's code changed since is unknown"
            ),
            Some(changed) if changed.is_empty() => write!(
                f,
                "the profile was made from commit {short}; the agent's sources are the same"
            ),
            Some(changed) => {
                let mut named = changed
                    .iter()
                    .take(NAMED)
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                if changed.len() > NAMED {
                    named.push_str(&format!(" and {} more", changed.len() - NAMED));
                }
                write!(
                    f,
                    "the profile was made from commit {short}; {} of the agent's source files \
                     changed since ({named}): their changed functions have no profile (make it \
                     again with `cargo xtask pgo`)",
                    changed.len()
                )
            }
        }
    }
}

/// The commit a `pgo.source` file names (`commit <sha>`).
fn commit_of(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("commit "))
        .map(str::trim)
        .filter(|c| c.len() >= 7 && c.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_owned)
}

/// Records that the profile is made from the checkout's HEAD; warns when the agent's sources
/// hold changes not committed (they will count as changed since). Without git the record of an
/// older profile is removed, so that the new one's age reads as unknown rather than wrong.
pub fn record() -> anyhow::Result<()> {
    let head = match git(&["rev-parse", "HEAD"]) {
        Ok(head) => head.trim().to_owned(),
        Err(e) => {
            println!(
                "== note: cannot tell which commit the profile was made from ({e:#}): the bench \
                 will call its age unknown"
            );
            return match fs::remove_file(source_file()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("cannot remove {}", source_file().display()))
                }
                _ => Ok(()),
            };
        }
    };
    if let Ok(Some(changed)) = changed_since(&head)
        && !changed.is_empty()
    {
        println!(
            "== note: the agent's sources differ from HEAD in {} file(s) ({}): the profile is \
             recorded as made from HEAD, so they will count as changed since; commit first",
            changed.len(),
            changed.join(", ")
        );
    }
    fs::write(source_file(), format!("commit {head}\n"))
        .with_context(|| format!("cannot write {}", source_file().display()))
}

/// The agent's source files that differ between `commit` and the work tree; `None` when git
/// is missing or does not hold the commit.
fn changed_since(commit: &str) -> anyhow::Result<Option<Vec<String>>> {
    if git(&["cat-file", "-e", &format!("{commit}^{{commit}}")]).is_err() {
        return Ok(None);
    }
    let sources = agent_sources()?;
    let mut args = vec!["diff", "--name-only", commit, "--"];
    args.extend(sources.iter().map(String::as_str));
    let out = git(&args)?;
    Ok(Some(
        out.lines()
            .filter(|path| is_source(path))
            .map(str::to_owned)
            .collect(),
    ))
}

/// Whether a changed file can change the agent's code: Rust sources and manifests, not the
/// profile or the link order that live beside them.
fn is_source(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    path.ends_with(".rs") || name == "Cargo.toml" || name == "Cargo.lock"
}

/// What the agent is built from, as paths relative to the workspace root: its crate's
/// directory, those of the workspace crates it depends on (not for its tests), and the lock
/// file.
fn agent_sources() -> anyhow::Result<Vec<String>> {
    let out = stdout_of(cargo().args([
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
        "--offline",
    ]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&out).context("`cargo metadata` printed no JSON")?;
    let root = root().to_string_lossy().into_owned();
    let mut paths: Vec<String> = crate_dirs(&metadata, "nodemesh-agent")
        .into_iter()
        .map(|dir| {
            dir.strip_prefix(&root)
                .map_or(dir.clone(), |d| d.trim_start_matches('/').to_owned())
        })
        .collect();
    paths.push("Cargo.lock".to_owned());
    Ok(paths)
}

/// The directories of `package` and of the path dependencies it builds with, transitively,
/// from `cargo metadata --no-deps`.
fn crate_dirs(metadata: &serde_json::Value, package: &str) -> BTreeSet<String> {
    let packages = metadata["packages"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut dirs = BTreeSet::new();
    let mut todo = vec![package.to_owned()];
    while let Some(name) = todo.pop() {
        let Some(package) = packages.iter().find(|p| p["name"] == name.as_str()) else {
            continue;
        };
        let Some(manifest) = package["manifest_path"].as_str() else {
            continue;
        };
        let dir = manifest.strip_suffix("/Cargo.toml").unwrap_or(manifest);
        if !dirs.insert(dir.to_owned()) {
            continue;
        }
        for dependency in package["dependencies"].as_array().into_iter().flatten() {
            if dependency["kind"] == "dev" || dependency["path"].is_null() {
                continue;
            }
            if let Some(name) = dependency["name"].as_str() {
                todo.push(name.to_owned());
            }
        }
    }
    dirs
}

fn git(args: &[&str]) -> anyhow::Result<String> {
    stdout_of(Command::new("git").current_dir(root()).args(args))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const COMMIT: &str = "e569781a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e";

    #[test]
    fn the_source_file_names_one_commit() {
        assert_eq!(
            commit_of(&format!("commit {COMMIT}\n")).as_deref(),
            Some(COMMIT)
        );
        assert_eq!(commit_of("commit not-a-sha\n"), None);
        assert_eq!(commit_of(""), None);
    }

    #[test]
    fn only_rust_sources_and_manifests_count_as_the_agents_code() {
        for source in [
            "agent/src/proxy.rs",
            "hbone/Cargo.toml",
            "Cargo.lock",
            "agent/build.rs",
        ] {
            assert!(is_source(source), "{source}");
        }
        for other in [
            "agent/layout.order",
            "agent/pgo.profdata",
            "agent/README.md",
        ] {
            assert!(!is_source(other), "{other}");
        }
    }

    #[test]
    fn the_agents_sources_are_its_crate_and_the_path_dependencies_it_builds_with() {
        let metadata = json!({"packages": [
            {"name": "nodemesh-agent", "manifest_path": "/w/agent/Cargo.toml", "dependencies": [
                {"name": "nodemesh-hbone", "kind": null, "path": "/w/hbone"},
                {"name": "tokio", "kind": null},
                {"name": "nodemesh-testserver", "kind": "dev", "path": "/w/testserver"},
            ]},
            {"name": "nodemesh-hbone", "manifest_path": "/w/hbone/Cargo.toml", "dependencies": [
                {"name": "nodemesh-identity", "kind": null, "path": "/w/identity"},
            ]},
            {"name": "nodemesh-identity", "manifest_path": "/w/identity/Cargo.toml",
             "dependencies": [{"name": "nodemesh-hbone", "kind": "build", "path": "/w/hbone"}]},
            {"name": "nodemesh-testserver", "manifest_path": "/w/testserver/Cargo.toml",
             "dependencies": []},
        ]});
        let dirs: Vec<_> = crate_dirs(&metadata, "nodemesh-agent")
            .into_iter()
            .collect();
        assert_eq!(dirs, ["/w/agent", "/w/hbone", "/w/identity"]);
    }

    #[test]
    fn a_stale_profile_names_what_changed_and_what_to_run() {
        let age = |changed: Option<Vec<&str>>| ProfileAge {
            made_from: Some(COMMIT.to_owned()),
            changed: changed.map(|c| c.into_iter().map(str::to_owned).collect()),
        };
        let same = age(Some(vec![]));
        assert!(same.is_current() && !same.is_stale());
        assert!(
            same.to_string()
                .contains("e569781a0b; the agent's sources are the same")
        );

        let files = vec!["a.rs", "b.rs", "c.rs", "d.rs", "e.rs", "f.rs", "g.rs"];
        let stale = age(Some(files));
        assert!(!stale.is_current() && stale.is_stale());
        let said = stale.to_string();
        assert!(
            said.contains("7 of the agent's source files changed since")
                && said.contains("(a.rs, b.rs, c.rs, d.rs, e.rs and 2 more)")
                && said.contains("cargo xtask pgo"),
            "{said}"
        );

        let unknown = age(None);
        assert!(!unknown.is_current() && !unknown.is_stale());
        assert!(unknown.to_string().contains("cannot be compared"));
        let unrecorded = ProfileAge {
            made_from: None,
            changed: None,
        };
        assert!(!unrecorded.is_current());
        assert!(unrecorded.to_string().contains("agent/pgo.source"));
    }
}
