use std::time::Duration;

use nodemesh_traffic::policy::{Backoff, BudgetSettings, RequestSettings, RetrySettings, Trigger};
use tower::{Layer as _, ServiceExt as _};

use super::*;
use crate::proxy::http::{
    flags_of, full_body,
    testing::{self, HttpResponseMaker, Scripted},
};

fn retrying(
    triggers: &[Trigger],
    codes: &[u16],
    retries: u32,
    budget: BudgetSettings,
) -> nodemesh_traffic::BackendTarget {
    let mut target = testing::target();
    target.request = Arc::new(RequestSettings {
        retry: Some(RetrySettings {
            num_retries: retries,
            triggers: triggers.iter().copied().collect(),
            status_codes: codes.to_vec(),
            backoff: Backoff::AtLeast(Duration::from_millis(10)),
            budget,
        }),
        ..RequestSettings::default()
    });
    target
}

fn layer() -> (RetryLayer, Arc<TrafficState>) {
    let state = Arc::new(TrafficState::new(&prometheus::Registry::new()));
    (RetryLayer::new(state.clone()), state)
}

#[tokio::test(start_paused = true)]
async fn a_failed_attempt_is_retried_and_the_client_sees_the_success() {
    let (layer, state) = layer();
    let inner = Scripted::statuses(&[503, 200]);
    let target = retrying(
        &[Trigger::RetriableStatusCodes],
        &[503],
        2,
        BudgetSettings::default(),
    );
    let mut req = testing::routed_request(target);
    *req.body_mut() = full_body("payload");
    let Ok(response) = layer.layer(inner.clone()).oneshot(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(inner.calls(), 2);
    let bodies = inner.bodies.lock().expect("lock").clone();
    assert_eq!(
        bodies,
        ["payload", "payload"],
        "the body is sent again whole"
    );
    let seen = inner.seen.lock().expect("lock");
    assert_eq!(
        seen[1].extensions.get::<AttemptNumber>(),
        Some(&AttemptNumber(1))
    );
    assert_eq!(
        state
            .metrics
            .retries
            .with_label_values(&["shop/web", "sent"])
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn retries_used_up_add_urx() {
    let (layer, _) = layer();
    let inner = Scripted::new(&[HttpResponseMaker::Failure(Attempt::ConnectFailure)]);
    let target = retrying(
        &[Trigger::ConnectFailure],
        &[],
        2,
        BudgetSettings::default(),
    );
    let Ok(response) = layer
        .layer(inner.clone())
        .oneshot(testing::routed_request(target))
        .await;
    assert_eq!(inner.calls(), 3, "the first attempt and two retries");
    assert!(flags_of(&response).contains(ResponseFlags::RETRY_LIMIT_EXCEEDED));
}

#[tokio::test(start_paused = true)]
async fn what_the_triggers_do_not_name_is_not_retried() {
    let (layer, _) = layer();
    let inner = Scripted::statuses(&[500]);
    let target = retrying(
        &[Trigger::RetriableStatusCodes],
        &[503],
        2,
        BudgetSettings::default(),
    );
    let Ok(response) = layer
        .layer(inner.clone())
        .oneshot(testing::routed_request(target))
        .await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(inner.calls(), 1);
    assert!(!flags_of(&response).contains(ResponseFlags::RETRY_LIMIT_EXCEEDED));
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_retries_whatever_the_policy_says() {
    let (layer, state) = layer();
    let inner = Scripted::statuses(&[503]);
    // 20 % of the requests, plus 1 a second: 100 requests earn 20 retries, and the paused
    // clock hardly moves.
    let budget = BudgetSettings {
        percent: 20,
        min_retries_per_second: 1,
        ttl: Duration::from_secs(10),
    };
    let target = retrying(&[Trigger::RetriableStatusCodes], &[503], 3, budget);
    let service = layer.layer(inner.clone());
    for _ in 0..100 {
        let Ok(_) = service
            .clone()
            .oneshot(testing::routed_request(target.clone()))
            .await;
    }
    let sent = state
        .metrics
        .retries
        .with_label_values(&["shop/web", "sent"])
        .get();
    let refused = state
        .metrics
        .retries
        .with_label_values(&["shop/web", "budget_exhausted"])
        .get();
    assert!(
        sent <= 20 + 10 + 1,
        "retries stay within the budget: {sent}"
    );
    assert!(sent >= 20, "the budget allows its share: {sent}");
    assert!(refused > 0);
    assert_eq!(inner.calls() as u64, 100 + sent);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_64_kib_is_sent_once() {
    let (layer, _) = layer();
    let inner = Scripted::statuses(&[503, 200]);
    let target = retrying(
        &[Trigger::RetriableStatusCodes],
        &[503],
        2,
        BudgetSettings::default(),
    );
    let mut req = testing::routed_request(target);
    *req.body_mut() = full_body(vec![7u8; 65 * 1024]);
    let Ok(response) = layer.layer(inner.clone()).oneshot(req).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(inner.calls(), 1);
    assert_eq!(
        inner.bodies.lock().expect("lock")[0].len(),
        65 * 1024,
        "nothing lost"
    );
}

#[tokio::test(start_paused = true)]
async fn an_attempt_timeout_is_504_ut_and_retried_under_reset() {
    let (layer, _) = layer();
    let mut target = retrying(&[Trigger::Reset], &[], 1, BudgetSettings::default());
    Arc::make_mut(&mut target.request).attempt_timeout = Some(Duration::from_millis(100));
    let inner = testing::slow_service(Duration::from_secs(1));
    let started = tokio::time::Instant::now();
    let Ok(response) = layer
        .layer(inner)
        .oneshot(testing::routed_request(target))
        .await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let flags = flags_of(&response);
    assert!(
        flags.contains(ResponseFlags::UPSTREAM_TIMEOUT)
            && flags.contains(ResponseFlags::RETRY_LIMIT_EXCEEDED),
        "{flags}"
    );
    assert_eq!(flags.text(), "UT,URX");
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(210),
        "two attempts and the back-off"
    );
}

#[tokio::test(start_paused = true)]
async fn without_retry_settings_a_request_is_sent_once() {
    let (layer, _) = layer();
    let inner = Scripted::statuses(&[503]);
    let Ok(response) = layer
        .layer(inner.clone())
        .oneshot(testing::routed_request(testing::target()))
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(inner.calls(), 1);
}
