//! `cargo xtask fuzz [--seconds N]`: runs each fuzz target (a proptest property over random,
//! structured input) for N seconds, in rounds of fresh random seeds. A failure stops the run
//! with the shrunk input; proptest writes its seed under the crate's `proptest-regressions/`,
//! and every later test run replays it: commit that file with the fix, and the crash is a
//! regression test.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;

use crate::{cargo, describe};

/// One fuzz target: a test of a crate's unit tests.
struct Target {
    package: &'static str,
    /// Which of the package's targets holds it: `--lib`, or `--bin NAME`.
    unit: &'static [&'static str],
    test: &'static str,
    what: &'static str,
}

const TARGETS: &[Target] = &[
    Target {
        package: "nodemesh-config",
        unit: &["--lib"],
        test: "fuzz::fuzz_config_loader",
        what: "the configuration loader, on mutated example files",
    },
    Target {
        package: "nodemesh-hbone",
        unit: &["--lib"],
        test: "fuzz::fuzz_hbone_connect",
        what: "HBONE CONNECT requests with random methods, authorities and headers",
    },
    Target {
        package: "nodemesh-hbone",
        unit: &["--lib"],
        test: "fuzz::fuzz_hbone_garbage",
        what: "random bytes where HBONE's HTTP/2 frames should be",
    },
    Target {
        package: "nodemesh-agent",
        unit: &["--bin", "nodemesh-agent"],
        test: "proxy::http::detect::tests::classification_is_stable",
        what: "protocol detection of a connection's first bytes",
    },
    Target {
        package: "nodemesh-agent",
        unit: &["--bin", "nodemesh-agent"],
        test: "proxy::sni::tests::any_first_bytes_get_an_answer",
        what: "the ClientHello reader",
    },
    Target {
        package: "nodemesh-policy",
        unit: &["--lib"],
        test: "normalize::tests::properties::any_text_is_normalised_or_refused_without_panicking",
        what: "the HTTP path normaliser, on any text",
    },
    Target {
        package: "nodemesh-policy",
        unit: &["--lib"],
        test: "normalize::tests::properties::normalising_is_idempotent_and_leaves_no_dot_segment",
        what: "the HTTP path normaliser, on paths made of what it decodes",
    },
    Target {
        package: "nodemesh-policy",
        unit: &["--lib"],
        test: "matcher::tests::matching_never_panics",
        what: "path and host patterns",
    },
    Target {
        package: "nodemesh-policy",
        unit: &["--lib"],
        test: "fuzz::fuzz_policy_matcher",
        what: "authorization decisions on random policies and requests",
    },
];

/// Cases per round at first; rounds grow while they are quick, so that little of the time
/// goes to starting the test binary.
const FIRST_ROUND: u32 = 256;
const LARGEST_ROUND: u32 = 1 << 16;

pub fn run(seconds: u64) -> anyhow::Result<()> {
    let budget = Duration::from_secs(seconds.max(1));
    for (package, unit) in distinct_units() {
        crate::run_step(
            cargo()
                .args(["test", "--no-run", "--quiet", "-p", package])
                .args(unit),
        )?;
    }
    for target in TARGETS {
        let started = Instant::now();
        let (mut cases, mut round, mut total) = (FIRST_ROUND, 0u64, 0u64);
        while round == 0 || started.elapsed() < budget {
            let seed = seed(round);
            let mut command = cargo();
            command
                .args(["test", "--quiet", "-p", target.package])
                .args(target.unit)
                .arg("--")
                .args(["--exact", target.test, "--test-threads", "1"])
                .env("PROPTEST_CASES", cases.to_string())
                .env("PROPTEST_RNG_SEED", seed.to_string())
                .env("PROPTEST_MAX_SHRINK_TIME", "60000");
            let round_started = Instant::now();
            let out = command.output()?;
            if !out.status.success() {
                eprintln!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                bail!(
                    "fuzz target {} ({}) failed with PROPTEST_RNG_SEED={seed}; the shrunk input is \
                     above and under {}/proptest-regressions/: fix the code and commit that \
                     file, it replays in every test run. Rerun: PROPTEST_RNG_SEED={seed} \
                     PROPTEST_CASES={cases} {}",
                    target.test,
                    target.what,
                    crate_dir(target.package),
                    describe(&command)
                );
            }
            total += u64::from(cases);
            round += 1;
            if round_started.elapsed() < Duration::from_secs(2) {
                cases = (cases * 2).min(LARGEST_ROUND);
            }
        }
        eprintln!(
            "fuzz {:<80} {total:>8} cases in {:.1} s: {}",
            target.test,
            started.elapsed().as_secs_f64(),
            target.what
        );
    }
    Ok(())
}

fn distinct_units() -> Vec<(&'static str, &'static [&'static str])> {
    let mut units: Vec<_> = TARGETS.iter().map(|t| (t.package, t.unit)).collect();
    units.sort_unstable();
    units.dedup();
    units
}

fn crate_dir(package: &str) -> &str {
    package.strip_prefix("nodemesh-").unwrap_or(package)
}

/// A fresh seed per round: the clock's nanoseconds, mixed with the round number.
fn seed(round: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (now ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}
