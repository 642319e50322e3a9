//! Resilience in the node proxies, with curl as the client: retries within a budget, outlier
//! ejection, circuit breaking, and local rate limits at the destination.

use std::time::{Duration, Instant};

use nodemesh_sandbox::poll_until;
use nodemesh_tests::{
    Answer, requests, set_fault,
    traffic::{SERVICES, client, policy, two_versions},
    write_config,
};

const SOON: Duration = Duration::from_secs(10);

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
