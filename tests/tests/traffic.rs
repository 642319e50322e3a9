//! Traffic management in the client's node proxy, with curl as the client: a canary split by
//! weight and by header, shifted under load; request timeouts; retries within a budget;
//! outlier ejection; circuit breaking; local rate limits at the destination.

use std::time::{Duration, Instant};

use nodemesh_sandbox::{Sandbox, poll_until};
use nodemesh_tests::{Answer, TestSandbox, requests, sandbox_with, set_fault, write_config};

const SOON: Duration = Duration::from_secs(10);

/// Two versions of `web` on node n2: n2-p1 is v1, n2-p2 is v2; both are `tier=web`.
fn two_versions(name: &str) -> Option<TestSandbox> {
    sandbox_with(name, |spec| {
        for (pod, version) in [("n2-p1", "v1"), ("n2-p2", "v2")] {
            spec.labels
                .push((pod.into(), "version".into(), version.into()));
            spec.labels.push((pod.into(), "tier".into(), "web".into()));
        }
    })
}

/// Services `web` (both versions), `web-v1` and `web-v2`, port 80 to the test server.
const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {tier: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: default}
spec: {clusterIP: 10.96.0.11, selector: {version: v1}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: default}
spec: {clusterIP: 10.96.0.12, selector: {version: v2}, ports: [{port: 80, targetPort: 8080}]}
";

fn canary(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-canary, namespace: default}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]
  rules:
  - matches: [{{headers: [{{name: x-canary, value: \"true\"}}]}}]
    backendRefs: [{{name: web-v2, port: 80}}]
  - backendRefs: [{{name: web-v1, port: 80, weight: {v1}}}, {{name: web-v2, port: 80, weight: {v2}}}]
"
    )
}

fn policy(name: &str, service: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: {service}}}]\n{spec}"
    )
}

fn share(answers: &[Answer], pod: &str) -> f64 {
    answers.iter().filter(|a| a.pod == pod).count() as f64 / answers.len().max(1) as f64
}

/// `nodemesh explain --json` against the sandbox's configuration, with node n1's agent for
/// endpoint health.
fn explain(sb: &Sandbox, args: &[&str]) -> serde_json::Value {
    let config = sb.config_dir().display().to_string();
    let agent = format!("http://{}", sb.node("n1").agent.admin);
    let mut all = vec!["explain", "--config", &config, "--agent", &agent, "--json"];
    all.extend_from_slice(args);
    let binary = nodemesh_tests::bin_dir()
        .join("nodemesh")
        .display()
        .to_string();
    let out = nodemesh_sandbox::run_in_netns(&sb.node("n1").netns, &binary, &all)
        .expect("run nodemesh explain");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "nodemesh explain gave no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn client(sb: &Sandbox) -> String {
    sb.pod("n1-p1").netns.clone()
}

#[test]
fn a_canary_gets_its_weight_a_header_pins_it_and_weights_shift_under_load_without_errors() {
    let Some(sb) = two_versions("tcanary") else {
        return;
    };
    write_config(&sb, "services.yaml", SERVICES);
    write_config(&sb, "route.yaml", &canary(90, 10));
    let netns = client(&sb);
    poll_until(SOON, || {
        let answers = requests(&netns, "http://10.96.0.10/", 20, &["-H", "x-canary: true"])?;
        anyhow::ensure!(answers.iter().all(|a| a.pod == "n2-p2"), "not routed yet");
        Ok(())
    })
    .expect("the route takes effect");

    let split = requests(&netns, "http://10.96.0.10/", 1000, &[]).expect("1000 requests");
    assert!(
        split.iter().all(|a| a.code == 200),
        "every request answered"
    );
    let canary_share = share(&split, "n2-p2");
    assert!(
        (0.07..=0.13).contains(&canary_share),
        "v2 gets 10 % ± 3 of 1000 requests: {canary_share}"
    );
    let pinned = requests(&netns, "http://10.96.0.10/", 100, &["-H", "x-canary: true"])
        .expect("canary requests");
    assert_eq!(
        share(&pinned, "n2-p2"),
        1.0,
        "x-canary: true always goes to v2"
    );

    // nodemesh explain says what the proxy did, with the endpoints' health from the agent.
    let explained = explain(
        &sb,
        &[
            "--from",
            "n1-p1",
            "--to",
            "web:80",
            "--header",
            "x-canary=true",
        ],
    );
    assert_eq!(explained["route"]["decision"]["rule"], 0, "{explained}");
    assert_eq!(
        explained["route"]["backends"][0]["service"],
        "default/web-v2"
    );
    let explained = explain(&sb, &["--from", "n1-p1", "--to", "web:80", "--path", "/"]);
    assert_eq!(explained["route"]["decision"]["rule"], 1, "{explained}");
    let shares: Vec<f64> = explained["route"]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter_map(|b| b["share_percent"].as_f64())
        .collect();
    assert_eq!(shares, [90.0, 10.0]);
    assert_eq!(
        explained["endpoints"][0]["health"]["health"], "healthy",
        "{explained}"
    );
    assert_eq!(explained["allowed"], true);

    // 200 requests a second for 5 s while the weights move to 50/50: nothing fails.
    let shifted = std::thread::scope(|scope| {
        let load =
            scope.spawn(|| requests(&netns, "http://10.96.0.10/", 1000, &["--rate", "200/s"]));
        std::thread::sleep(Duration::from_secs(1));
        let changed = Instant::now();
        write_config(&sb, "route.yaml", &canary(50, 50));
        let answers = load.join().expect("load thread").expect("the load ran");
        (answers, changed.elapsed())
    });
    let (answers, _) = shifted;
    let failed: Vec<&Answer> = answers.iter().filter(|a| a.code != 200).collect();
    assert!(
        failed.is_empty(),
        "no failed request during the shift: {failed:?}"
    );
    // The last 400 requests came 3 s after the change: the new weights were in force.
    let after = share(&answers[600..], "n2-p2");
    assert!(
        (0.38..=0.62).contains(&after),
        "50/50 after the change: {after}"
    );

    write_config(&sb, "route.yaml", &canary(0, 100));
    let all_v2 = poll_until(SOON, || {
        let answers = requests(&netns, "http://10.96.0.10/", 100, &[])?;
        anyhow::ensure!(share(&answers, "n2-p2") == 1.0, "v1 still answers");
        Ok(answers)
    })
    .expect("0/100 moves everything to v2");
    assert!(all_v2.iter().all(|a| a.code == 200));

    // One curl per request: curl 7.88 does not reuse a prior-knowledge HTTP/2 connection.
    for _ in 0..5 {
        let h2 = requests(
            &netns,
            "http://10.96.0.10/",
            1,
            &["--http2-prior-knowledge"],
        )
        .expect("h2c through the route");
        assert!(h2[0].code == 200 && h2[0].pod == "n2-p2", "{h2:?}");
    }
}

#[test]
fn a_request_timeout_answers_504_ut_and_no_route_answers_404_nr() {
    let Some(sb) = two_versions("ttimeout") else {
        return;
    };
    write_config(&sb, "services.yaml", SERVICES);
    write_config(
        &sb,
        "policy.yaml",
        &policy(
            "slow",
            "web-v1",
            "  timeout:\n    http: {requestTimeout: 500ms}\n",
        ),
    );
    write_config(
        &sb,
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api-only, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web-v2, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n",
    );
    let netns = client(&sb);
    let answer = poll_until(SOON, || {
        let answer = requests(&netns, "http://10.96.0.11/delay/2000", 1, &[])?.remove(0);
        anyhow::ensure!(answer.code == 504, "not in force yet: {answer:?}");
        Ok(answer)
    })
    .expect("the request times out");
    assert!(
        (0.4..=0.6).contains(&answer.seconds),
        "504 after 0.5 s ± 0.1: {}",
        answer.seconds
    );
    let fast = requests(&netns, "http://10.96.0.11/delay/100", 1, &[]).expect("fast request");
    assert_eq!(fast[0].code, 200);

    let unrouted = poll_until(SOON, || {
        let answer = requests(&netns, "http://10.96.0.12/elsewhere", 1, &[])?.remove(0);
        anyhow::ensure!(answer.code == 404, "route not in force yet: {answer:?}");
        Ok(answer)
    })
    .expect("a request no rule matches");
    assert_eq!(
        unrouted.pod, "",
        "answered by the proxy, not the application"
    );
    assert_eq!(
        requests(&netns, "http://10.96.0.12/api/items", 1, &[]).expect("routed")[0].code,
        200
    );

    let metrics = sb.agent_metrics("n1").expect("metrics");
    for flags in ["UT", "NR"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_requests_total{")
                    && l.contains("reporter=\"source\"")
                    && l.contains(&format!("response_flags=\"{flags}\""))),
            "istio_requests_total counts flag {flags}"
        );
    }
}

#[test]
fn a_retry_hides_one_failure_and_the_budget_bounds_what_a_failing_backend_receives() {
    let Some(sb) = two_versions("tretry") else {
        return;
    };
    write_config(&sb, "services.yaml", SERVICES);
    write_config(
        &sb,
        "policy.yaml",
        &policy(
            "retry",
            "web-v2",
            "  retry:\n    numRetries: 2\n    retryOn: {httpStatusCodes: [503]}\n    perRetry: {backOff: {baseInterval: 1ms, maxInterval: 2ms}}\n",
        ),
    );
    let netns = client(&sb);
    poll_until(SOON, || {
        set_fault(&sb, "n2-p2", Some(r#"{"status": 503, "count": 1}"#))?;
        let answer = requests(&netns, "http://10.96.0.12/", 1, &[])?.remove(0);
        anyhow::ensure!(answer.code == 200, "not retried yet: {answer:?}");
        Ok(())
    })
    .expect("the policy takes effect");
    // The pod's own count, read around the mesh: n2-p2 asks itself.
    let pod_url = format!("http://{}/", sb.pod("n2-p2").server.http);
    let served = || -> u64 {
        requests(&sb.pod("n2-p2").netns, &pod_url, 1, &[]).expect("direct request")[0]
            .served
            .expect("x-served")
    };
    let before = served();
    set_fault(&sb, "n2-p2", Some(r#"{"status": 503, "count": 1}"#)).expect("fault");
    let answer = requests(&netns, "http://10.96.0.12/", 1, &[])
        .expect("request")
        .remove(0);
    assert_eq!(answer.code, 200, "the client never sees the failure");
    assert_eq!(
        answer.served,
        Some(before + 2),
        "x-served shows the failed attempt and the retry"
    );

    // Everything fails for 10 s at 100 requests a second: retries stay within the budget
    // (20 % of the requests plus 10 a second).
    set_fault(&sb, "n2-p2", Some(r#"{"status": 503}"#)).expect("fault");
    let start = requests(&netns, "http://10.96.0.12/", 1, &[])
        .expect("request")
        .remove(0);
    let first = start.served.expect("x-served");
    let began = Instant::now();
    let load = requests(&netns, "http://10.96.0.12/", 1000, &["--rate", "100/s"]).expect("load");
    let seconds = began.elapsed().as_secs_f64();
    assert!(
        load.iter().all(|a| a.code == 503),
        "the backend fails them all"
    );
    set_fault(&sb, "n2-p2", None).expect("clear");
    let end = requests(&netns, "http://10.96.0.12/", 1, &[])
        .expect("request")
        .remove(0);
    let received = end.served.expect("x-served") - first - 1;
    // 1.2 × the requests, plus the minimum of 10 a second over the run (and one second's
    // worth kept at its start).
    let budget = (1.2 * 1000.0 + 10.0 * (seconds + 1.0)) as u64;
    assert!(
        received <= budget,
        "the backend received {received} attempts for 1000 requests in {seconds:.1} s, more \
         than {budget}"
    );
    assert!(received > 1000, "some retries were sent: {received}");
    let metrics = sb.agent_metrics("n1").expect("metrics");
    assert!(
        metrics.lines().any(
            |l| l.starts_with("nodemesh_http_retries_total{") && l.contains("budget_exhausted")
        ),
        "retries refused by the budget are counted"
    );
}

#[test]
fn a_failing_endpoint_is_ejected_and_used_again_once_it_recovers() {
    let Some(sb) = two_versions("teject") else {
        return;
    };
    write_config(
        &sb,
        "services.yaml",
        &format!(
            "{SERVICES}---\n{}",
            policy(
                "eject",
                "web",
                // Round robin, so that the failing endpoint gets its share until ejected
                // (least request would steer away from it by latency alone).
                "  loadBalancer: {type: RoundRobin}\n  healthCheck:\n    passive: {consecutive5XxErrors: 3, baseEjectionTime: 3s, maxEjectionPercent: 50, interval: 1s}\n",
            )
        )
        .replace("name: http, port: 80, targetPort: 8080", "name: http, port: 80, targetPort: 8080, appProtocol: http"),
    );
    let netns = client(&sb);
    poll_until(SOON, || {
        let answers = requests(&netns, "http://10.96.0.10/", 20, &[])?;
        anyhow::ensure!(
            answers.iter().any(|a| a.pod == "n2-p1"),
            "one endpoint only"
        );
        Ok(())
    })
    .expect("both endpoints answer");
    set_fault(&sb, "n2-p1", Some(r#"{"status": 503}"#)).expect("fault");
    let warmup = requests(&netns, "http://10.96.0.10/", 50, &[]).expect("requests");
    assert!(
        warmup.iter().filter(|a| a.code == 503).count() <= 3,
        "ejected after 3 failures"
    );
    let after = requests(&netns, "http://10.96.0.10/", 500, &[]).expect("requests");
    let ok = after.iter().filter(|a| a.code == 200).count();
    assert!(
        ok >= 495,
        "at least 99 % of 500 requests succeed after the ejection: {ok}"
    );
    let endpoints = sb.agent_admin("n1", "/endpoints").expect("/endpoints");
    assert!(endpoints.to_string().contains("ejected"), "{endpoints}");

    set_fault(&sb, "n2-p1", None).expect("recover");
    poll_until(SOON, || {
        let answers = requests(&netns, "http://10.96.0.10/", 20, &[])?;
        anyhow::ensure!(answers.iter().any(|a| a.pod == "n2-p1"), "still ejected");
        Ok(())
    })
    .expect("the endpoint serves again after baseEjectionTime");
    let metrics = sb.agent_metrics("n1").expect("metrics");
    assert!(metrics.contains("nodemesh_outlier_ejections_total{service=\"default/web\"} 1"));
}

#[test]
fn over_max_parallel_requests_the_rest_get_503_uo_at_once() {
    let Some(sb) = two_versions("tbreaker") else {
        return;
    };
    write_config(&sb, "services.yaml", SERVICES);
    write_config(
        &sb,
        "policy.yaml",
        &policy(
            "breaker",
            "web-v1",
            "  circuitBreaker: {maxParallelRequests: 4}\n  timeout:\n    http: {requestTimeout: 5s}\n",
        ),
    );
    let netns = client(&sb);
    poll_until(SOON, || {
        let answer = requests(&netns, "http://10.96.0.11/", 1, &[])?.remove(0);
        anyhow::ensure!(
            answer.code == 200,
            "the Service is not known yet: {answer:?}"
        );
        Ok(())
    })
    .expect("the Service answers");
    let parallel = ["--parallel", "--parallel-immediate", "--parallel-max", "16"];
    let answers = poll_until(SOON, || {
        let answers = requests(&netns, "http://10.96.0.11/delay/1000", 16, &parallel)?;
        anyhow::ensure!(
            answers.iter().any(|a| a.code == 503),
            "no limit yet: {answers:?}"
        );
        Ok(answers)
    })
    .expect("the limit takes effect");
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.code == 503).collect();
    assert_eq!(refused.len(), 12, "{answers:?}");
    assert!(
        refused.iter().all(|a| a.seconds < 0.5 && a.pod.is_empty()),
        "refused at once by the proxy: {refused:?}"
    );
    assert_eq!(answers.iter().filter(|a| a.code == 200).count(), 4);
    let metrics = sb.agent_metrics("n1").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("response_flags=\"UO\"")
                && l.contains("response_code=\"503\""))
    );
}

#[test]
fn a_local_rate_limit_admits_its_limit_per_second_to_all_clients_together() {
    let Some(sb) = two_versions("tlimit") else {
        return;
    };
    write_config(&sb, "services.yaml", SERVICES);
    write_config(
        &sb,
        "policy.yaml",
        &policy(
            "limit",
            "web-v1",
            "  rateLimit:\n    type: Local\n    local:\n      rules:\n      - limit: {requests: 50, unit: Second}\n",
        ),
    );
    let netns = client(&sb);
    let pod_url = format!("http://{}/", sb.pod("n2-p1").server.http);
    poll_until(SOON, || {
        let answers = requests(&netns, &pod_url, 60, &[])?;
        anyhow::ensure!(answers.iter().any(|a| a.code == 429), "not limited yet");
        Ok(())
    })
    .expect("the limit takes effect");
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let answers = requests(&netns, &pod_url, 1000, &["--rate", "200/s"]).expect("load");
    let elapsed = started.elapsed().as_secs_f64();
    let accepted = answers.iter().filter(|a| a.code == 200).count() as f64;
    let refused = answers.iter().filter(|a| a.code == 429).count() as f64;
    assert_eq!(accepted + refused, 1000.0, "only 200 and 429");
    // 50 a second, the first second's bucket included.
    let (low, high) = (
        50.0 * elapsed.floor() * 0.9,
        50.0 * (elapsed.ceil() + 1.0) * 1.1,
    );
    assert!(
        (low..=high).contains(&accepted),
        "{accepted} accepted in {elapsed:.1} s: 50 ± 10 % a second"
    );
    let metrics = sb.agent_metrics("n2").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("response_flags=\"RL\"")
                && l.contains("response_code=\"429\""))
    );
    assert!(metrics.contains(
        "nodemesh_rate_limited_requests_total{policy=\"default/limit\",workload=\"default/n2-p1\"}"
    ));
    // Another client on another node shares the same bucket.
    let legacy = requests(&sb.pod("n1-legacy").netns, &pod_url, 100, &[]).expect("legacy client");
    assert!(
        legacy.iter().any(|a| a.code == 429),
        "plaintext clients are limited too"
    );
}
