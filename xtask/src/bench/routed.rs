//! The HTTP paths, measured in the same run against no mesh and against the L4 mesh path to
//! the same pod: the routed path (a Service with an HTTPRoute and a BackendTrafficPolicy with a
//! request timeout and retries, so that every request goes through the client's HTTP stack),
//! and the L4 path with HTTP request metrics on (`telemetry.httpProcessing`: the destination's
//! proxy reads every request).

use std::{fmt::Write as _, path::Path, time::Duration};

use nodemesh_sandbox::{Sandbox, poll_until};
use serde::Serialize;

use super::{Measured, Plan, tools};

/// The Service's address: n2-p1 behind it, the L4 case's server.
const ROUTED_URL: &str = "http://10.96.2.10/";

const CONFIG: &str = "apiVersion: v1
kind: Service
metadata: {name: routed, namespace: default}
spec: {clusterIP: 10.96.2.10, selector: {app: n2-p1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: routed, namespace: default}
spec:
  parentRefs: [{group: \"\", kind: Service, name: routed, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: routed, port: 80}]
---
apiVersion: policy.nodemesh.dev/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: routed, namespace: default}
spec:
  targetRefs: [{group: \"\", kind: Service, name: routed}]
  timeout:
    http: {requestTimeout: 10s}
  retry:
    numRetries: 2
    retryOn: {triggers: [connect-failure, reset], httpStatusCodes: [503]}
";

/// Request metrics on for the whole mesh.
const HTTP_METRICS_CONFIG: &str = "apiVersion: nodemesh.dev/v1alpha1
kind: MeshSettings
metadata: {name: default, namespace: nodemesh-system}
spec:
  telemetry: {httpProcessing: true}
";
const HTTP_METRICS_FILE: &str = "bench-http-metrics.yaml";

/// What an HTTP path measured.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Routed {
    pub http_c1: tools::LoadResult,
    pub http_c16: tools::LoadResult,
    pub cpu_ms_per_1000: f64,
    pub http_fixed: tools::LoadResult,
}

/// One figure: no mesh, the L4 mesh path, the routed path.
#[derive(Debug, Clone, Serialize)]
pub struct RoutedRow {
    pub figure: String,
    pub unit: &'static str,
    pub no_mesh: f64,
    pub l4_mesh: f64,
    /// The L4 mesh path with request metrics on.
    pub http_metrics: f64,
    pub routed: f64,
}

/// Figure by figure, the median of repetitions.
pub fn median(runs: &[Routed]) -> Routed {
    let loads = |f: fn(&Routed) -> tools::LoadResult| {
        super::median_load(&runs.iter().map(f).collect::<Vec<_>>())
    };
    Routed {
        http_c1: loads(|r| r.http_c1),
        http_c16: loads(|r| r.http_c16),
        cpu_ms_per_1000: super::median(runs.iter().map(|r| r.cpu_ms_per_1000).collect()),
        http_fixed: loads(|r| r.http_fixed),
    }
}

/// Installs the route and policy, waits until requests go through the HTTP stack, measures.
pub fn measure(sandbox: &Sandbox, plan: Plan, script: &Path) -> anyhow::Result<Routed> {
    let client = routed_service(sandbox)?;
    load(&client, ROUTED_URL, plan, script)
}

/// Records the agents during the routed path's keep-alive loads (`--profile`), as
/// `routed-c1-<node>` and `routed-c16-<node>`.
pub fn profile(
    sandbox: &Sandbox,
    plan: Plan,
    script: &Path,
    probe: &mut super::Probe,
) -> anyhow::Result<()> {
    let client = routed_service(sandbox)?;
    let requests = |l: &tools::LoadResult| l.requests as f64;
    for (figure, threads, connections) in [("routed-c1", 1, 1), ("routed-c16", 2, 16)] {
        super::probed(Some(&mut *probe), figure, "request", requests, || {
            tools::wrk(
                &client,
                ROUTED_URL,
                threads,
                connections,
                plan.seconds,
                false,
                script,
            )
        })?;
    }
    Ok(())
}

/// Configures the routed Service and waits until n1-p1's requests to it go through the HTTP
/// stack; the client's network namespace.
fn routed_service(sandbox: &Sandbox) -> anyhow::Result<String> {
    std::fs::write(sandbox.config_dir().join("bench-routed.yaml"), CONFIG)?;
    let client = sandbox.pod("n1-p1").netns.clone();
    poll_until(Duration::from_secs(15), || {
        let answer = nodemesh_sandbox::curl::requests(&client, ROUTED_URL, 1, &[])?.remove(0);
        anyhow::ensure!(
            answer.code == 200,
            "the routed Service does not answer: {answer:?}"
        );
        Ok(())
    })?;
    let metrics = sandbox.agent_metrics("n1")?;
    anyhow::ensure!(
        metrics.contains("destination_service=\"routed.default.svc.cluster.local\""),
        "requests to the routed Service did not go through the HTTP stack"
    );
    Ok(client)
}

/// Turns request metrics on for the whole mesh, waits until n2's proxy counts the requests to
/// n2-p1, measures the L4 path to it, and turns them off again before the next case.
pub fn measure_http_metrics(
    sandbox: &Sandbox,
    plan: Plan,
    script: &Path,
) -> anyhow::Result<Routed> {
    let file = sandbox.config_dir().join(HTTP_METRICS_FILE);
    let client = sandbox.pod("n1-p1").netns.clone();
    let url = format!("http://{}/", sandbox.pod("n2-p1").server.http);
    // Whether one more request shows in the destination's request metrics.
    let counted = || -> anyhow::Result<bool> {
        let before = requests_to(&sandbox.agent_metrics("n2")?, "n2-p1");
        let answer = nodemesh_sandbox::curl::requests(&client, &url, 1, &[])?.remove(0);
        anyhow::ensure!(answer.code == 200, "n2-p1 does not answer: {answer:?}");
        Ok(requests_to(&sandbox.agent_metrics("n2")?, "n2-p1") > before)
    };
    std::fs::write(&file, HTTP_METRICS_CONFIG)?;
    let measured = poll_until(Duration::from_secs(15), || {
        anyhow::ensure!(counted()?, "requests to n2-p1 are not counted yet");
        Ok(())
    })
    .and_then(|()| load(&client, &url, plan, script));
    std::fs::remove_file(&file)?;
    poll_until(Duration::from_secs(15), || {
        anyhow::ensure!(!counted()?, "request metrics are still on");
        Ok(())
    })?;
    measured
}

/// `istio_requests_total` as the destination reports it, for requests to `workload`.
fn requests_to(metrics: &str, workload: &str) -> f64 {
    let workload = format!("destination_workload=\"{workload}\"");
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("istio_requests_total{")
                && line.contains("reporter=\"destination\"")
                && line.contains(&workload)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The HTTP loads of the L4 case, against `url`.
fn load(client: &str, url: &str, plan: Plan, script: &Path) -> anyhow::Result<Routed> {
    let t = plan.seconds;
    let http_c1 = tools::wrk(client, url, 1, 1, t, false, script)?;
    let before = tools::host_busy_ms()?;
    let http_c16 = tools::wrk(client, url, 2, 16, t, false, script)?;
    let cpu_ms = tools::host_busy_ms()? - before;
    let http_fixed = tools::oha(client, url, plan.fixed_rate, 4, t)?;
    Ok(Routed {
        cpu_ms_per_1000: if http_c16.requests > 0 {
            cpu_ms / http_c16.requests as f64 * 1000.0
        } else {
            0.0
        },
        http_c1,
        http_c16,
        http_fixed,
    })
}

pub fn rows(
    no_mesh: &Measured,
    l4: &Measured,
    metrics: &Routed,
    routed: &Routed,
    rate: u32,
) -> Vec<RoutedRow> {
    let row = |figure: String,
               unit,
               f: fn(&tools::LoadResult) -> f64,
               pick: [&tools::LoadResult; 4]| RoutedRow {
        figure,
        unit,
        no_mesh: f(pick[0]),
        l4_mesh: f(pick[1]),
        http_metrics: f(pick[2]),
        routed: f(pick[3]),
    };
    vec![
        row(
            "HTTP keep-alive, 1 connection: p50".into(),
            "µs",
            |l| l.latency.p50_us,
            [
                &no_mesh.http_c1,
                &l4.http_c1,
                &metrics.http_c1,
                &routed.http_c1,
            ],
        ),
        row(
            "HTTP keep-alive, 16 connections: throughput".into(),
            "req/s",
            |l| l.per_second,
            [
                &no_mesh.http_c16,
                &l4.http_c16,
                &metrics.http_c16,
                &routed.http_c16,
            ],
        ),
        row(
            format!("HTTP at {rate} req/s: p50"),
            "µs",
            |l| l.latency.p50_us,
            [
                &no_mesh.http_fixed,
                &l4.http_fixed,
                &metrics.http_fixed,
                &routed.http_fixed,
            ],
        ),
        row(
            format!("HTTP at {rate} req/s: p99"),
            "µs",
            |l| l.latency.p99_us,
            [
                &no_mesh.http_fixed,
                &l4.http_fixed,
                &metrics.http_fixed,
                &routed.http_fixed,
            ],
        ),
        RoutedRow {
            figure: "host CPU per 1000 requests (16 conn.)".into(),
            unit: "ms",
            no_mesh: no_mesh.cpu_ms_per_1000,
            l4_mesh: l4.cpu_ms_per_1000,
            http_metrics: metrics.cpu_ms_per_1000,
            routed: routed.cpu_ms_per_1000,
        },
    ]
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "n/a".to_owned()
    } else {
        format!("{:.2}x", a / b)
    }
}

pub fn markdown(rows: &[RoutedRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nThe HTTP paths, cross node, against the same requests without the mesh and through \
         the L4 mesh path to n2-p1: the L4 path with request metrics on (`telemetry.httpProcessing`: \
         n2's proxy reads every request), and n1-p1 to a Service with an HTTPRoute and a \
         BackendTrafficPolicy (request timeout, retries) in front of n2-p1 (routed).\n"
    );
    let _ = writeln!(
        out,
        "| figure | no mesh | L4 mesh | L4 + request metrics | routed | metrics / L4 | routed / L4 | routed / no mesh |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} ({}) | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            row.figure,
            row.unit,
            row.no_mesh,
            row.l4_mesh,
            row.http_metrics,
            row.routed,
            ratio(row.http_metrics, row.l4_mesh),
            ratio(row.routed, row.l4_mesh),
            ratio(row.routed, row.no_mesh),
        );
    }
    out
}
