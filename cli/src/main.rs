//! `nodemesh`: the operator's tool.
//!
//! - `nodemesh check DIR` validates a configuration directory offline: exit 0 when valid,
//!   1 with one line per error (file, object, field, what to do) otherwise. Fit for CI.
//! - `nodemesh explain --from POD --to POD:PORT [--method M --path P --header K=V]` says
//!   whether the mesh lets that connection or request through, and which policy and rule
//!   decide, against a directory or the running controller.
//! - `nodemesh status --controller URL [--agent URL]...` summarises the mesh: configuration
//!   version and errors, which agents applied it, workloads, certificates, eBPF counters.
#![forbid(unsafe_code)]

mod check;
mod explain;
mod source;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nodemesh",
    version,
    about = "Check nodemesh configuration and explain its decisions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration directory (or file) without running anything.
    Check(check::CheckArgs),
    /// Explain whether a connection or HTTP request is allowed, and why.
    Explain(Box<explain::ExplainArgs>),
    /// Summarise the mesh from the controller's and the agents' admin endpoints.
    Status(status::StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Explain(args) => explain::run(&args),
        Command::Status(args) => status::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nodemesh: {e:#}");
            ExitCode::from(2)
        }
    }
}
