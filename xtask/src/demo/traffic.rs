//! The demo's traffic steps: a canary release shifted under load with no failed request, and a
//! failing backend the mesh hides (retried elsewhere, then ejected).

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use nodemesh_sandbox::{
    Sandbox,
    curl::{Answer, requests, set_fault},
    poll_until,
};

/// The labels the traffic examples' Services select on.
pub const LABELS: [(&str, &str, &str); 4] = [
    ("n2-p1", "version", "v1"),
    ("n2-p2", "version", "v2"),
    ("n2-p1", "tier", "app"),
    ("n2-p2", "tier", "app"),
];

const APP: &str = "http://10.96.1.10/";

fn install(sandbox: &Sandbox, example: &str) -> anyhow::Result<()> {
    let from = crate::root().join("examples/traffic").join(example);
    std::fs::copy(&from, sandbox.config_dir().join(example))
        .with_context(|| format!("cannot copy {}", from.display()))?;
    Ok(())
}

/// The canary route with other weights.
fn weights(sandbox: &Sandbox, v1: u32, v2: u32) -> anyhow::Result<()> {
    let example = crate::root().join("examples/traffic/canary.yaml");
    let text = std::fs::read_to_string(&example)?
        .replace("weight: 90", &format!("weight: {v1}"))
        .replace("weight: 10", &format!("weight: {v2}"));
    std::fs::write(sandbox.config_dir().join("canary.yaml"), text)?;
    Ok(())
}

fn counts(answers: &[Answer]) -> String {
    let v1 = answers.iter().filter(|a| a.pod == "n2-p1").count();
    let v2 = answers.iter().filter(|a| a.pod == "n2-p2").count();
    let failed = answers.iter().filter(|a| a.code != 200).count();
    format!("v1 (n2-p1) {v1}, v2 (n2-p2) {v2}, failed {failed}")
}

pub fn show_canary(sandbox: &Sandbox) -> anyhow::Result<()> {
    println!(
        "\n== 9. a canary release: copy examples/traffic/services.yaml and canary.yaml (app: 90 % v1, 10 % v2)"
    );
    install(sandbox, "services.yaml")?;
    install(sandbox, "canary.yaml")?;
    let client = sandbox.pod("n1-p1").netns.clone();
    poll_until(Duration::from_secs(10), || {
        let answers = requests(&client, APP, 10, &["-H", "x-canary: true"])?;
        anyhow::ensure!(answers.iter().all(|a| a.pod == "n2-p2"), "not routed yet");
        Ok(())
    })?;
    let split = requests(&client, APP, 1000, &[])?;
    println!("   1000 requests from n1-p1 to app: {}", counts(&split));
    let pinned = requests(&client, APP, 100, &["-H", "x-canary: true"])?;
    println!("   100 requests with x-canary: true: {}", counts(&pinned));
    println!("   200 requests a second for 5 s while the weights move to 50/50, then 0/100:");
    let answers = std::thread::scope(|scope| -> anyhow::Result<Vec<Answer>> {
        let load = scope.spawn(|| requests(&client, APP, 1000, &["--rate", "200/s"]));
        std::thread::sleep(Duration::from_millis(1500));
        weights(sandbox, 50, 50)?;
        std::thread::sleep(Duration::from_millis(1500));
        weights(sandbox, 0, 100)?;
        load.join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))?
    })?;
    for (second, chunk) in answers.chunks(200).enumerate() {
        println!("     second {}: {}", second + 1, counts(chunk));
    }
    let failed = answers.iter().filter(|a| a.code != 200).count();
    println!("   {failed} of 1000 requests failed during the shift");
    std::fs::remove_file(sandbox.config_dir().join("canary.yaml"))?;
    Ok(())
}

pub fn show_failure(sandbox: &Sandbox, nodemesh: &Path) -> anyhow::Result<()> {
    println!(
        "\n== 10. a failing backend: copy examples/traffic/resilience.yaml, then make n2-p1 answer every request with 503"
    );
    install(sandbox, "resilience.yaml")?;
    let client = sandbox.pod("n1-p1").netns.clone();
    poll_until(Duration::from_secs(10), || {
        let answers = requests(&client, APP, 20, &[])?;
        anyhow::ensure!(
            answers.iter().all(|a| a.code == 200) && answers.iter().any(|a| a.pod == "n2-p1"),
            "not both endpoints yet"
        );
        Ok(())
    })?;
    set_fault(sandbox, "n2-p1", Some(r#"{"status": 503}"#))?;
    // Eight at a time, so that least request spreads them over both endpoints.
    let parallel = ["--parallel", "--parallel-immediate", "--parallel-max", "8"];
    let answers = requests(&client, APP, 500, &parallel)?;
    println!(
        "   500 requests from n1-p1 to app, 8 at a time: {}",
        counts(&answers)
    );
    println!(
        "   (n2-p1's failures were retried on n2-p2 until n2-p1 was ejected; the clients saw none)"
    );
    let metrics = sandbox.agent_metrics("n1")?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("nodemesh_outlier_ejections_total{")
            || l.starts_with("nodemesh_http_retries_total{")
    }) {
        println!("   {line}");
    }
    let out = nodemesh_sandbox::run_in_netns(
        &sandbox.node("n1").netns,
        &nodemesh.display().to_string(),
        &[
            "explain",
            "--config",
            &sandbox.config_dir().display().to_string(),
            "--from",
            "n1-p1",
            "--to",
            "app:80",
            "--path",
            "/",
            "--agent",
            &format!("http://{}", sandbox.node("n1").agent.admin),
        ],
    )?;
    println!("   nodemesh explain --from n1-p1 --to app:80 --agent <n1's admin>:");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("     {line}");
    }
    set_fault(sandbox, "n2-p1", None)?;
    std::fs::remove_file(sandbox.config_dir().join("resilience.yaml"))?;
    Ok(())
}
