//! `nodemesh check`.

use std::{path::PathBuf, process::ExitCode};

use nodemesh_config::load_path;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The configuration directory or file.
    path: PathBuf,
}

pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    match load_path(&args.path) {
        Ok(mesh) => {
            let enrolled = mesh
                .workloads
                .values()
                .filter(|w| mesh.is_enrolled(w))
                .count();
            println!(
                "{}: valid: {} namespaces, {} workloads ({enrolled} in the mesh), {} services, \
                 {} authorization policies, {} peer authentications",
                args.path.display(),
                mesh.namespaces.len(),
                mesh.workloads.len(),
                mesh.services.len(),
                mesh.authorization_policies.len(),
                mesh.peer_authentications.len(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            eprintln!("{}: {} error(s)", args.path.display(), errors.0.len());
            Ok(ExitCode::FAILURE)
        }
    }
}
