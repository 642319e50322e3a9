//! `cargo xtask test`: what CI runs. Formatting, clippy with warnings denied (host workspace
//! and eBPF programs), then every test, the namespaced ones included (they need root and the
//! built binaries, which this builds first), and a short run of every fuzz target.

use crate::{Profile, build, cargo, require_root, root, run_step, setup};

/// Seconds of each fuzz target in a test run.
const FUZZ_SECONDS: u64 = 3;

pub fn run() -> anyhow::Result<()> {
    require_root("`cargo xtask test` (the namespaced tests)")?;
    setup::run()?;
    run_step(cargo().args(["fmt", "--all", "--check"]))?;
    crate::manifests::check()?;
    crate::manifests::validate()?;
    run_step(
        build::nightly_cargo()
            .current_dir(root().join("ebpf/programs"))
            .args(["fmt", "--check"]),
    )?;
    run_step(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run_step(
        build::nightly_cargo()
            .current_dir(root().join("ebpf/programs"))
            .env("CARGO_TARGET_DIR", crate::target_dir().join("bpf"))
            .args(["clippy", "--release", "--", "-D", "warnings"]),
    )?;
    build::run(Profile::Dev)?;
    run_step(
        cargo()
            .args(["test", "--workspace", "--", "--test-threads", "2"])
            .env("NODEMESH_REQUIRE_NAMESPACED_TESTS", "1"),
    )?;
    // A short run of every fuzz target, on fresh seeds each time.
    crate::fuzz::run(FUZZ_SECONDS)?;
    Ok(())
}
