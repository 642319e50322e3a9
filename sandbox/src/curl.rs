//! Many requests from a pod with one curl, and the test server's fault switch: what tests,
//! the demo and the benchmark use to drive HTTP through the mesh with a real client.

use std::path::PathBuf;

use crate::Sandbox;

/// One answer seen by curl.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub code: u16,
    /// The test server's `x-pod`, empty when the mesh answered itself.
    pub pod: String,
    /// The test server's `x-served`.
    pub served: Option<u64>,
    pub seconds: f64,
}

/// Runs one curl in a pod's namespace for `n` requests to `url`, in order on kept-alive
/// connections (or as `extra` says: `--parallel`, `--rate 200/s`, `--http2-prior-knowledge`),
/// and returns each answer. Bounded by curl's `--max-time` per request.
pub fn requests(netns: &str, url: &str, n: usize, extra: &[&str]) -> anyhow::Result<Vec<Answer>> {
    let config = tempfile_path("curl");
    let mut text = String::new();
    for _ in 0..n {
        text.push_str(&format!("url = \"{url}\"\noutput = /dev/null\n"));
    }
    std::fs::write(&config, text)?;
    let mut args = vec![
        "-sS",
        "--max-time",
        "10",
        "-w",
        "%{http_code} %header{x-pod} %header{x-served} %{time_total}\\n",
    ];
    args.extend_from_slice(extra);
    let config_arg = config.display().to_string();
    args.extend(["-K", &config_arg]);
    let out = crate::run_in_netns(netns, "curl", &args);
    let _ = std::fs::remove_file(&config);
    let out = out?;
    let text = String::from_utf8(out.stdout)?;
    let answers: Vec<Answer> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let [code, pod, served, seconds] = fields[..] else {
                return None;
            };
            Some(Answer {
                code: code.parse().ok()?,
                pod: pod.to_owned(),
                served: served.parse().ok(),
                seconds: seconds.parse().ok()?,
            })
        })
        .collect();
    anyhow::ensure!(
        answers.len() == n,
        "curl answered {} of {n} requests to {url}: {}",
        answers.len(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(answers)
}

/// A path for a scratch file of this test process.
fn tempfile_path(what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "nodemesh-curl-{}-{what}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Sets the test server's fault switch in `pod` (`PUT /fault` with `json`, or `DELETE` when
/// `None`), from the pod itself.
pub fn set_fault(sandbox: &Sandbox, pod: &str, json: Option<&str>) -> anyhow::Result<()> {
    let pod = sandbox.pod(pod);
    let url = format!("http://{}/fault", pod.server.http);
    let args: Vec<&str> = match json {
        Some(json) => vec!["-sS", "--fail", "-X", "PUT", "-d", json, &url],
        None => vec!["-sS", "--fail", "-X", "DELETE", &url],
    };
    let out = crate::run_in_netns(&pod.netns, "curl", &args)?;
    anyhow::ensure!(
        out.status.success(),
        "setting the fault of {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
