//! `cargo xtask sandbox up|down|status`.

use clap::Subcommand;
use nodemesh_sandbox::{DEFAULT_NAME, Sandbox, Spec, Status};

use crate::{Profile, build, require_root, setup};

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Build, then bring the sandbox up and return when it is ready. Safe to repeat.
    Up {
        /// Nodes (network namespaces running an agent each).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Enrolled pods per node; each node also gets one pod in namespace `legacy`.
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// Use optimised binaries.
        #[arg(long)]
        release: bool,
        /// Also run a Prometheus server scraping every agent and the controller.
        #[arg(long)]
        prometheus: bool,
        /// A label beyond app=<pod>, as POD=KEY=VALUE (e.g. n2-p1=version=v1), so that
        /// Services can select several pods; repeat for more.
        #[arg(long = "label", value_name = "POD=KEY=VALUE", value_parser = nodemesh_sandbox::parse_label)]
        labels: Vec<(String, String, String)>,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// An operator's root CA certificate (PEM) for the controller to sign with instead of
        /// creating one, so that the sandbox shares a root with another mesh. With --ca-key.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<std::path::PathBuf>,
        /// The private key (PEM) of --ca-cert.
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<std::path::PathBuf>,
    },
    /// Remove every namespace, link, process and file the sandbox made. Safe to repeat.
    Down {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Describe the running sandbox.
    Status {
        /// Print the machine-readable description.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
}

pub fn run(command: SandboxCommand) -> anyhow::Result<()> {
    match command {
        SandboxCommand::Up {
            nodes,
            pods,
            release,
            prometheus,
            labels,
            name,
            ca_cert,
            ca_key,
        } => {
            require_root("the sandbox")?;
            setup::run()?;
            let profile = if release {
                Profile::Release
            } else {
                Profile::Dev
            };
            let bin_dir = build::run(profile)?;
            let spec = Spec {
                nodes,
                pods,
                prometheus,
                labels,
                ca: ca_cert.zip(ca_key),
                ..Spec::new(&name, bin_dir)
            };
            let sandbox = Sandbox::up(&spec)?;
            print_summary(sandbox.status());
            Ok(())
        }
        SandboxCommand::Down { name } => {
            require_root("the sandbox")?;
            nodemesh_sandbox::down(&name)?;
            eprintln!("sandbox {name} is down");
            Ok(())
        }
        SandboxCommand::Status { json, name } => match Sandbox::find(&name)? {
            Some(sandbox) if json => {
                println!("{}", serde_json::to_string_pretty(sandbox.status())?);
                Ok(())
            }
            Some(sandbox) => {
                print_summary(sandbox.status());
                Ok(())
            }
            None => {
                anyhow::bail!("sandbox {name} is not up; start it with `cargo xtask sandbox up`")
            }
        },
    }
}

pub fn print_summary(status: &Status) {
    let state = if status.is_running() {
        "up"
    } else {
        "DEGRADED (a process or namespace is gone)"
    };
    println!(
        "sandbox {} is {state}; mesh config: {}",
        status.name,
        status.config_dir.display()
    );
    println!(
        "  controller     netns {:<12} pid {:<7} monitoring http://{}",
        status.controller.netns, status.controller.pid, status.controller.monitoring
    );
    for node in &status.nodes {
        println!(
            "  node {:<4} netns {:<12} ip {:<11} agent pid {:<7} admin http://{}",
            node.name, node.netns, node.ip, node.agent.pid, node.agent.admin
        );
    }
    for pod in &status.pods {
        let mesh = match &pod.identity {
            Some(identity) => identity.as_str(),
            None => "not enrolled",
        };
        println!(
            "  pod  {:<10} netns {:<15} ip {:<11} {mesh}",
            pod.name, pod.netns, pod.ip
        );
    }
    if let Some(prometheus) = &status.prometheus {
        println!(
            "  prometheus     netns {:<12} {}",
            prometheus.netns.as_deref().unwrap_or("host"),
            prometheus.url
        );
    }
    println!(
        "  try: ip netns exec {} curl -s http://{}:8080/",
        first_netns(status),
        second_ip(status)
    );
}

fn first_netns(status: &Status) -> &str {
    status.pods.first().map_or("", |p| p.netns.as_str())
}

fn second_ip(status: &Status) -> String {
    status
        .pods
        .iter()
        .rfind(|p| p.enrolled)
        .map_or_else(String::new, |p| p.ip.to_string())
}
