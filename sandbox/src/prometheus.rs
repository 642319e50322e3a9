//! A real Prometheus server (Debian's package) in the fabric namespace, scraping every
//! agent's metrics endpoint and the controller's, for `sandbox up --prometheus`.

use std::{fs, time::Duration};

use anyhow::{Context as _, bail};

use crate::{
    Status,
    http::http_get,
    layout::Layout,
    poll_until,
    process::{is_alive, spawn_in_netns},
    status::PrometheusStatus,
};

pub const PORT: u16 = 9090;
/// Scrapes often, so that tests and users see traffic within seconds.
const SCRAPE_INTERVAL: &str = "1s";

fn config(status: &Status) -> String {
    let agents: Vec<String> = status
        .nodes
        .iter()
        .map(|n| format!("'{}'", n.agent.metrics))
        .collect();
    format!(
        "# Written by the nodemesh sandbox.\n\
         global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
         scrape_configs:\n\
         - job_name: nodemesh-agent\n  metrics_path: /metrics\n  static_configs:\n  - targets: [{}]\n\
         - job_name: nodemesh-controller\n  metrics_path: /metrics\n  static_configs:\n  - targets: ['{}']\n",
        agents.join(", "),
        status.controller.monitoring
    )
}

pub fn start(layout: &Layout, status: &Status) -> anyhow::Result<PrometheusStatus> {
    let binary = std::path::Path::new("/usr/bin/prometheus");
    if !binary.is_file() {
        bail!(
            "{} is missing; `cargo xtask setup` installs Debian's prometheus",
            binary.display()
        );
    }
    let dir = layout.state_dir().join("prometheus");
    fs::create_dir_all(dir.join("data"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let config_file = dir.join("prometheus.yml");
    fs::write(&config_file, config(status))
        .with_context(|| format!("cannot write {}", config_file.display()))?;
    let listen = format!("{}:{PORT}", layout.fabric_ip());
    let log = layout.logs_dir().join("prometheus.log");
    let args = [
        format!("--config.file={}", config_file.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={listen}"),
        "--storage.tsdb.retention.time=1d".to_owned(),
    ];
    let pid = spawn_in_netns(&layout.fabric_netns(), binary, &args, &log)?;
    Ok(PrometheusStatus {
        pid,
        netns: Some(layout.fabric_netns()),
        url: format!("http://{listen}"),
        log,
    })
}

pub fn wait_ready(prometheus: &PrometheusStatus, timeout: Duration) -> anyhow::Result<()> {
    let netns = prometheus.netns.as_deref().unwrap_or_default();
    let url = format!("{}/-/ready", prometheus.url);
    poll_until(timeout, || {
        if !is_alive(prometheus.pid) {
            bail!("prometheus exited; see {}", prometheus.log.display());
        }
        let response = http_get(netns, &url, Duration::from_secs(1))?;
        anyhow::ensure!(
            response.status == 200,
            "prometheus not ready: {}",
            response.body.trim()
        );
        Ok(())
    })
}
