//! What the mesh reports: Istio's metrics from both ends, the access log, request metrics and
//! traces once HTTP processing is on.

use std::{fs, time::Duration};

use nodemesh_sandbox::{http_get, poll_until};
use nodemesh_tests::{curl, echo_from, sandbox};

const SOON: Duration = Duration::from_secs(10);

/// The series of `name` whose labels include every `label="value"` given.
fn series(text: &str, name: &str, labels: &[&str]) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn both_ends_report_istio_metrics_and_log_the_connection() {
    let Some(sb) = sandbox("tmetrics") else {
        return;
    };
    let echo = echo_from(
        &sb.pod("n1-p1").netns,
        sb.pod("n2-p1").server.echo,
        b"12345",
    )
    .expect("echo");
    assert_eq!(echo.reply, b"12345");

    let pair = [
        "source_workload=\"n1-p1\"",
        "source_workload_namespace=\"default\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/n1-p1\"",
        "destination_workload=\"n2-p1\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/n2-p1\"",
        "connection_security_policy=\"mutual_tls\"",
        "request_protocol=\"tcp\"",
    ];
    poll_until(SOON, || {
        for (node, reporter) in [
            ("n1", "reporter=\"source\""),
            ("n2", "reporter=\"destination\""),
        ] {
            let text = sb.agent_metrics(node)?;
            let mut labels = pair.to_vec();
            labels.push(reporter);
            for name in [
                "istio_tcp_connections_opened_total",
                "istio_tcp_connections_closed_total",
                "istio_tcp_received_bytes_total",
                "istio_tcp_sent_bytes_total",
            ] {
                anyhow::ensure!(
                    !series(&text, name, &labels).is_empty(),
                    "{node}: no {name} with {labels:?}"
                );
            }
            let received = series(&text, "istio_tcp_received_bytes_total", &labels);
            anyhow::ensure!(
                received.iter().any(|l| l.ends_with(" 5")),
                "{node}: 5 bytes received: {received:?}"
            );
        }
        Ok(())
    })
    .expect("the source and the destination both report the connection");

    let log = fs::read_to_string(&sb.node("n2").agent.access_log).expect("access log");
    let line: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|l: &serde_json::Value| {
            l["kind"] == "connection"
                && l["original_dst"] == sb.pod("n2-p1").server.echo.to_string()
        })
        .expect("a connection line in n2's access log");
    assert_eq!(
        line["source_identity"],
        "spiffe://cluster.local/ns/default/sa/n1-p1"
    );
    assert_eq!(line["bytes_from_client"], 5);
    assert_eq!(line["security"], "mtls");
}

#[test]
fn with_tracing_a_request_carries_traceparent_and_yields_a_span() {
    let Some(sb) = sandbox("ttrace") else { return };
    let collector = sb.pod("n1-legacy").server.http;
    let settings = format!(
        "apiVersion: nodemesh.dev/v1alpha1\nkind: MeshSettings\nmetadata:\n  name: default\n  namespace: nodemesh-system\nspec:\n  telemetry:\n    tracing:\n      otlpEndpoint: http://{collector}\n      randomSamplingPercentage: 100\n"
    );
    fs::write(sb.config_dir().join("mesh-settings.yaml"), settings).expect("write MeshSettings");
    let url = format!("http://{}/headers", sb.pod("n2-p1").server.http);
    let trace_id = poll_until(SOON, || {
        let (status, body) = curl(&sb.pod("n1-p1").netns, &url, &[])?;
        anyhow::ensure!(status == 200, "HTTP {status}");
        let headers: serde_json::Value = serde_json::from_str(&body)?;
        let traceparent = headers["traceparent"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no traceparent yet: {headers}"))?;
        Ok(traceparent.split('-').nth(1).unwrap_or_default().to_owned())
    })
    .expect("the request reaches the server with a traceparent");

    let span = poll_until(SOON, || {
        let exports = http_get(
            &sb.pod("n1-legacy").netns,
            &format!("http://{collector}/v1/traces"),
            Duration::from_secs(5),
        )?
        .json()?;
        exports
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|e| {
                e["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .find(|s| s["traceId"] == trace_id.as_str())
            .ok_or_else(|| anyhow::anyhow!("no span of trace {trace_id} exported yet"))
    })
    .expect("the proxy exports a span over OTLP");
    let attribute = |key: &str| {
        span["attributes"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["key"] == key))
            .map(|x| x["value"]["stringValue"].clone())
            .unwrap_or_default()
    };
    assert_eq!(attribute("source.workload"), "n1-p1");
    assert_eq!(attribute("destination.workload"), "n2-p1");
    assert_eq!(attribute("http.request.method"), "GET");
    assert_eq!(attribute("http.response.status_code"), "200");

    // A sampled trace context from the client is continued, not replaced.
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (_, body) = curl(
        &sb.pod("n1-p1").netns,
        &url,
        &["-H", &format!("traceparent: {incoming}")],
    )
    .expect("curl");
    let headers: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let forwarded = headers["traceparent"].as_str().unwrap_or_default();
    assert!(
        forwarded.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{forwarded}"
    );
    assert!(
        !forwarded.contains("b7ad6b7169203331"),
        "the proxy's span becomes the parent"
    );

    let text = sb.agent_metrics("n2").expect("metrics");
    let requests = series(
        &text,
        "istio_requests_total",
        &[
            "reporter=\"destination\"",
            "source_workload=\"n1-p1\"",
            "response_code=\"200\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(
        !requests.is_empty(),
        "request metrics with HTTP processing on: {text}"
    );
    assert!(
        !series(
            &text,
            "istio_request_duration_milliseconds_bucket",
            &["destination_workload=\"n2-p1\""]
        )
        .is_empty()
    );

    let log = fs::read_to_string(&sb.node("n2").agent.access_log).expect("access log");
    assert!(
        log.lines()
            .any(|l| l.contains("\"kind\":\"request\"") && l.contains("\"path\":\"/headers\"")),
        "a request line in the access log"
    );

    // Connections read as HTTP count their bytes too.
    let received = || -> anyhow::Result<f64> {
        let text = sb.agent_metrics("n2")?;
        Ok(series(
            &text,
            "istio_tcp_received_bytes_total",
            &["reporter=\"destination\"", "source_workload=\"n1-p1\""],
        )
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
    };
    let before = received().expect("metrics");
    let (status, _) = curl(&sb.pod("n1-p1").netns, &url, &[]).expect("curl");
    assert_eq!(status, 200);
    poll_until(SOON, || {
        let now = received()?;
        anyhow::ensure!(now >= before + 50.0, "received bytes {before} -> {now}");
        Ok(())
    })
    .expect("the request's bytes are counted on its connection");
}

#[test]
fn a_real_prometheus_returns_the_mesh_metrics() {
    let Some(sb) = nodemesh_tests::sandbox_with("tprom", |spec| spec.prometheus = true) else {
        return;
    };
    let prometheus = sb
        .status()
        .prometheus
        .clone()
        .expect("prometheus in the status");
    assert!(prometheus.url.starts_with("http://"), "{prometheus:?}");
    let netns = prometheus.netns.clone().expect("a namespace");
    let echo = echo_from(&sb.pod("n1-p1").netns, sb.pod("n2-p1").server.echo, b"p").expect("echo");
    assert_eq!(echo.reply, b"p");

    let query = "istio_tcp_connections_closed_total%7Bsource_workload%3D%22n1-p1%22%2Cdestination_workload%3D%22n2-p1%22%2Cconnection_security_policy%3D%22mutual_tls%22%7D";
    let reporters = poll_until(Duration::from_secs(30), || {
        let answer = http_get(
            &netns,
            &format!("{}/api/v1/query?query={query}", prometheus.url),
            Duration::from_secs(5),
        )?
        .json()?;
        anyhow::ensure!(answer["status"] == "success", "{answer}");
        let mut reporters: Vec<String> = answer["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["metric"]["reporter"].as_str().map(str::to_owned))
            .collect();
        reporters.sort();
        anyhow::ensure!(reporters.len() == 2, "not scraped yet: {answer}");
        Ok(reporters)
    })
    .expect("Prometheus scraped both agents");
    assert_eq!(reporters, ["destination", "source"]);

    let targets = http_get(
        &netns,
        &format!("{}/api/v1/targets", prometheus.url),
        Duration::from_secs(5),
    )
    .expect("targets")
    .json()
    .expect("JSON");
    let jobs: Vec<&str> = targets["data"]["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["labels"]["job"].as_str())
        .collect();
    assert!(jobs.contains(&"nodemesh-controller"), "{jobs:?}");
}
