//! `cargo xtask setup`: installs whatever a fresh machine of this kind lacks. Each step first
//! checks, so a second run takes well under a second.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{describe, require_root, run_step};

/// Debian packages the build, the sandbox and the tests use.
/// - llvm-22-dev, libpolly-22-dev: bpf-linker links against LLVM 22 (rustc's LLVM);
/// - iproute2, util-linux (nsenter), procps (sysctl): the sandbox;
/// - curl: the demo and tests use a real HTTP client;
/// - tcpdump: tests capture a node's uplink to prove it carries only TLS;
/// - prometheus: `sandbox up --prometheus` runs a real one scraping the mesh;
/// - containernetworking-plugins: the CNI reference plugins (bridge, host-local, loopback),
///   which tests run ahead of nodemesh-cni as a container runtime would.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "util-linux",
    "procps",
    "curl",
    "tcpdump",
    "prometheus",
    "containernetworking-plugins",
];

const BPF_LINKER_VERSION: &str = "0.13";

/// PyPI's kubernetes-validate, which checks rendered manifests against Kubernetes' schemas;
/// kept in a virtualenv of its own, outside the checkout.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const TOOLS_DIR: &str = "/opt/nodemesh-tools";

/// The kubernetes-validate command `setup` installs.
pub fn kubernetes_validate() -> std::path::PathBuf {
    std::path::Path::new(TOOLS_DIR).join("kubernetes-validate/bin/kubernetes-validate")
}

fn has_kubernetes_validate() -> bool {
    Command::new(kubernetes_validate())
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(KUBERNETES_VALIDATE_VERSION)
        })
}

/// kubectl renders the kustomization offline (`kubectl kustomize`); it comes with this
/// machine kind and no registry here ships it, so setup can only say it is missing.
fn require_kubectl() -> anyhow::Result<()> {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        bail!(
            "kubectl is missing: install a kubectl client (with kustomize) to render \
             manifests/; it is only used offline"
        );
    }
    Ok(())
}

/// Installs the Debian packages of `packages` that are missing; returns those it installed.
fn apt_install<'a>(packages: &[&'a str]) -> anyhow::Result<Vec<&'a str>> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        require_root("installing Debian packages")?;
        eprintln!("setup: installing {}", missing.join(" "));
        run_step(Command::new("apt-get").args(["update", "-q"]))?;
        run_step(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(missing)
}

pub fn run() -> anyhow::Result<()> {
    let installed_now = apt_install(PACKAGES)?;
    if installed_now.contains(&"prometheus") && std::path::Path::new("/run/systemd/system").exists()
    {
        // The package starts a Prometheus on the host's network; the sandbox runs its own.
        run_step(Command::new("systemctl").args(["disable", "--now", "prometheus"]))?;
    }
    if !has_bpf_linker() {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (takes a few minutes)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run_step(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--version"])
                .arg(format!("~{BPF_LINKER_VERSION}"))
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("PATH", path)
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO_TARGET_DIR"),
        )?;
    }
    require_kubectl()?;
    if !has_kubernetes_validate() {
        eprintln!("setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION}");
        let venv = std::path::Path::new(TOOLS_DIR).join("kubernetes-validate");
        run_step(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run_step(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!(
                    "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
                )),
        )?;
    }
    if !has_nightly_rust_src()? {
        eprintln!("setup: adding rust-src to the nightly toolchain");
        run_step(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// What `cargo xtask bench` needs besides the build: load tools, rsvg-convert and a font for
/// the chart, perf for profiles (Debian), oha (crates.io) for latency at a fixed rate, and
/// inferno (crates.io) to draw flame graphs from perf's samples.
const BENCH_PACKAGES: &[&str] = &[
    "wrk",
    "iperf3",
    "sockperf",
    "librsvg2-bin",
    "fonts-dejavu-core",
    "linux-perf",
];
const OHA_VERSION: &str = "1.16.0";
const INFERNO_VERSION: &str = "0.12.8";

/// One of inferno's commands, as cargo installs them.
pub fn inferno_binary(name: &str) -> std::path::PathBuf {
    let home = std::env::var("CARGO_HOME")
        .or_else(|_| std::env::var("HOME").map(|h| format!("{h}/.cargo")))
        .unwrap_or_else(|_| "/root/.cargo".to_owned());
    std::path::Path::new(&home).join("bin").join(name)
}

pub fn bench_tools() -> anyhow::Result<()> {
    apt_install(BENCH_PACKAGES)?;
    let oha = crate::bench_oha_binary();
    let has_oha = Command::new(&oha)
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(OHA_VERSION));
    if !has_oha {
        eprintln!("setup: installing oha {OHA_VERSION} (takes a few minutes)");
        run_step(
            Command::new("cargo")
                .args(["install", "oha", "--locked", "--version", OHA_VERSION])
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO_TARGET_DIR"),
        )?;
    }
    // inferno's commands print no version: ask cargo what it installed.
    let has_inferno = inferno_binary("inferno-flamegraph").is_file()
        && Command::new("cargo")
            .args(["install", "--list"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .output()
            .is_ok_and(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|l| l.starts_with(&format!("inferno v{INFERNO_VERSION}:")))
            });
    if !has_inferno {
        eprintln!("setup: installing inferno {INFERNO_VERSION} (flame graphs)");
        run_step(
            Command::new("cargo")
                .args([
                    "install",
                    "inferno",
                    "--locked",
                    "--version",
                    INFERNO_VERSION,
                ])
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO_TARGET_DIR"),
        )?;
    }
    Ok(())
}

/// rustup's `llvm-profdata` for the toolchain that builds (`cargo xtask pgo` merges the
/// agents' counts with it): the `llvm-tools` component, added when missing.
pub fn llvm_profdata() -> anyhow::Result<std::path::PathBuf> {
    // <sysroot>/lib/rustlib/<host>/lib: the tools lie next to it, in bin/.
    let libdir = crate::rustc_output(&["--print", "target-libdir"])?;
    let libdir = std::path::PathBuf::from(libdir.trim());
    let tool = libdir.with_file_name("bin").join("llvm-profdata");
    if !tool.is_file() {
        eprintln!("setup: adding llvm-tools to the toolchain (llvm-profdata)");
        run_step(Command::new("rustup").current_dir(crate::root()).args([
            "component",
            "add",
            "llvm-tools",
        ]))?;
        if !tool.is_file() {
            bail!(
                "rustup added llvm-tools but {} is still missing",
                tool.display()
            );
        }
    }
    Ok(tool)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout == b"installed")
}

fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .contains(&format!("bpf-linker {BPF_LINKER_VERSION}."))
        })
}

fn has_nightly_rust_src() -> anyhow::Result<bool> {
    let mut command = Command::new("rustup");
    command.args(["component", "list", "--installed", "--toolchain", "nightly"]);
    let out = command
        .output()
        .with_context(|| format!("cannot run `{}`", describe(&command)))?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing (`{}` failed); the eBPF programs need it",
            describe(&command)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src")))
}
