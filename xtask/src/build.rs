//! Building: the eBPF object with the nightly toolchain for bpfel-unknown-none, then every
//! workspace binary; the object is copied next to the binaries, where the agent looks for it.
//! Release builds are optimised with the agent's profile (`agent/pgo.profdata`, see
//! `cargo xtask pgo`) when the rustc that made it builds.

use std::{fs, path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{
    Profile,
    bench::pgo::{ProfileUse, add_rustflags},
    bin_dir, cargo, root, run_step, target_dir,
};

/// Builds everything and returns the directory holding the binaries and the eBPF object.
pub fn run(profile: Profile) -> anyhow::Result<PathBuf> {
    let object = build_ebpf()?;
    let mut build = match profile {
        Profile::Release => release_cargo()?,
        Profile::Dev => cargo(),
    };
    build.args(["build", "--workspace", "--bins"]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    run_step(&mut build)?;
    let dir = bin_dir(profile);
    let dest = dir.join("nodemesh-ebpf.o");
    fs::copy(&object, &dest)
        .with_context(|| format!("cannot copy {} to {}", object.display(), dest.display()))?;
    Ok(dir)
}

/// `cargo` for a release build: with the rustc flags that apply the agent's profile when it
/// applies (else it says why not). Every release build goes through here, so that they share
/// their compiled crates.
pub fn release_cargo() -> anyhow::Result<Command> {
    let mut command = cargo();
    let profile = ProfileUse::current()?;
    match profile.flags() {
        Some(flags) => add_rustflags(&mut command, &flags),
        None => eprintln!("note: {profile}"),
    }
    Ok(command)
}

/// Builds the eBPF programs; returns the object's path.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    let target = target_dir().join("bpf");
    let mut command = nightly_cargo();
    command
        .current_dir(root().join("ebpf/programs"))
        .args(["build", "--release"])
        .env("CARGO_TARGET_DIR", &target);
    run_step(&mut command)?;
    Ok(target.join("bpfel-unknown-none/release/nodemesh-ebpf"))
}

/// `cargo` of the nightly toolchain, without the variables the outer (stable) cargo set for
/// this process, which would otherwise pin the inner build to stable.
pub fn nightly_cargo() -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", "nightly", "cargo"]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO",
        "CARGO_MANIFEST_DIR",
        "CARGO_TARGET_DIR",
    ] {
        command.env_remove(var);
    }
    command
}
