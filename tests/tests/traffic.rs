//! Routing in the client's node proxy, with curl as the client: a canary split by weight and
//! by header, shifted under load; request timeouts; requests no route matches.

use std::time::{Duration, Instant};

use nodemesh_sandbox::poll_until;
use nodemesh_tests::{
    Answer, requests,
    traffic::{SERVICES, canary, client, explain, policy, share, two_versions},
    write_config,
};

const SOON: Duration = Duration::from_secs(10);

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
