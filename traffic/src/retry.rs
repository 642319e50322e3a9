//! Whether an attempt is worth another, with Envoy's `retry_on` semantics, and how long to
//! wait before it.

use std::time::Duration;

use crate::policy::{Backoff, RetrySettings, Trigger};

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// An answer, with its gRPC status when the answer carries one in its headers.
    Answered {
        status: u16,
        grpc_status: Option<u32>,
    },
    /// The endpoint could not be connected to.
    ConnectFailure,
    /// The connection was reset or closed before an answer.
    Reset,
    /// The endpoint refused the HTTP/2 stream.
    RefusedStream,
    /// The attempt's own timeout passed.
    Timeout,
    /// A circuit breaker refused the attempt before it was sent.
    Overflow,
}

const GRPC_CANCELLED: u32 = 1;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
const GRPC_INTERNAL: u32 = 13;
const GRPC_UNAVAILABLE: u32 = 14;

/// Whether the retry settings retry this outcome.
pub fn retriable(settings: &RetrySettings, attempt: Attempt) -> bool {
    let on = |trigger| settings.triggers.contains(&trigger);
    match attempt {
        Attempt::Answered {
            status,
            grpc_status,
        } => {
            let grpc = |code, trigger| grpc_status == Some(code) && on(trigger);
            (on(Trigger::FiveXx) && status >= 500)
                || (on(Trigger::GatewayError) && matches!(status, 502..=504))
                || (on(Trigger::Retriable4xx) && status == 409)
                || (on(Trigger::RetriableStatusCodes) && settings.status_codes.contains(&status))
                || grpc(GRPC_CANCELLED, Trigger::GrpcCancelled)
                || grpc(GRPC_DEADLINE_EXCEEDED, Trigger::GrpcDeadlineExceeded)
                || grpc(GRPC_INTERNAL, Trigger::GrpcInternal)
                || grpc(GRPC_RESOURCE_EXHAUSTED, Trigger::GrpcResourceExhausted)
                || grpc(GRPC_UNAVAILABLE, Trigger::GrpcUnavailable)
        }
        // "5xx" and "gateway-error" include no answer at all.
        Attempt::ConnectFailure => {
            on(Trigger::ConnectFailure) || on(Trigger::FiveXx) || on(Trigger::GatewayError)
        }
        Attempt::Reset | Attempt::Timeout => {
            on(Trigger::Reset) || on(Trigger::FiveXx) || on(Trigger::GatewayError)
        }
        Attempt::RefusedStream => on(Trigger::RefusedStream) || on(Trigger::FiveXx),
        // Envoy does not retry what its own circuit breakers refuse.
        Attempt::Overflow => false,
    }
}

/// The wait before retry `n` (1 for the first retry). `draw` is uniform in [0, 1).
pub fn backoff(backoff: Backoff, n: u32, draw: f64) -> Duration {
    match backoff {
        Backoff::AtLeast(wait) => wait,
        Backoff::Jittered { base, max } => {
            // Envoy: a random wait up to (2^n - 1) × base, capped at max.
            let factor = (1u64 << n.min(20)) - 1;
            let ceiling = base
                .checked_mul(u32::try_from(factor).unwrap_or(u32::MAX))
                .unwrap_or(max)
                .min(max);
            ceiling.mul_f64(draw.clamp(0.0, 1.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::policy::BudgetSettings;

    fn settings(triggers: &[Trigger], codes: &[u16]) -> RetrySettings {
        RetrySettings {
            num_retries: 2,
            triggers: triggers.iter().copied().collect::<BTreeSet<_>>(),
            status_codes: codes.to_vec(),
            backoff: Backoff::AtLeast(Duration::ZERO),
            budget: BudgetSettings::default(),
        }
    }

    fn answered(status: u16) -> Attempt {
        Attempt::Answered {
            status,
            grpc_status: None,
        }
    }

    #[test]
    fn status_codes_are_retried_only_when_listed() {
        let s = settings(&[Trigger::RetriableStatusCodes], &[503]);
        assert!(retriable(&s, answered(503)));
        assert!(!retriable(&s, answered(500)));
        assert!(!retriable(&s, answered(200)));
        assert!(
            !retriable(&s, Attempt::ConnectFailure),
            "connect-failure not asked for"
        );
    }

    #[test]
    fn five_xx_and_gateway_error_include_no_answer() {
        let five = settings(&[Trigger::FiveXx], &[]);
        for attempt in [
            answered(500),
            answered(599),
            Attempt::ConnectFailure,
            Attempt::Reset,
            Attempt::Timeout,
        ] {
            assert!(retriable(&five, attempt), "{attempt:?}");
        }
        assert!(!retriable(&five, answered(499)));
        let gateway = settings(&[Trigger::GatewayError], &[]);
        assert!(retriable(&gateway, answered(502)));
        assert!(!retriable(&gateway, answered(500)));
        assert!(retriable(&gateway, Attempt::ConnectFailure));
    }

    #[test]
    fn connect_failure_and_reset_are_separate_triggers() {
        let connect = settings(&[Trigger::ConnectFailure], &[]);
        assert!(retriable(&connect, Attempt::ConnectFailure));
        assert!(!retriable(&connect, Attempt::Reset));
        let reset = settings(&[Trigger::Reset], &[]);
        assert!(retriable(&reset, Attempt::Reset));
        assert!(
            retriable(&reset, Attempt::Timeout),
            "a per-try timeout resets the attempt"
        );
        assert!(!retriable(&reset, Attempt::ConnectFailure));
        assert!(!retriable(
            &settings(&[Trigger::FiveXx], &[]),
            Attempt::Overflow
        ));
    }

    #[test]
    fn grpc_statuses_are_read_from_the_answer() {
        let s = settings(&[Trigger::GrpcUnavailable, Trigger::GrpcCancelled], &[]);
        let grpc = |code| Attempt::Answered {
            status: 200,
            grpc_status: Some(code),
        };
        assert!(retriable(&s, grpc(14)));
        assert!(retriable(&s, grpc(1)));
        assert!(!retriable(&s, grpc(4)), "deadline-exceeded not asked for");
        assert!(!retriable(&s, grpc(0)));
        assert!(retriable(
            &settings(&[Trigger::GrpcDeadlineExceeded], &[]),
            grpc(4)
        ));
    }

    #[test]
    fn jittered_backoff_grows_and_is_capped() {
        let b = Backoff::Jittered {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        };
        assert_eq!(
            backoff(b, 1, 0.999_999),
            Duration::from_millis(25).mul_f64(0.999_999)
        );
        assert_eq!(
            backoff(b, 2, 0.5),
            Duration::from_micros(37_500),
            "up to 3 × base"
        );
        assert_eq!(
            backoff(b, 10, 1.0),
            Duration::from_millis(250),
            "capped at max"
        );
        assert_eq!(
            backoff(b, 3, 0.0),
            Duration::ZERO,
            "full jitter starts at zero"
        );
        assert_eq!(
            backoff(Backoff::AtLeast(Duration::from_millis(10)), 5, 0.3),
            Duration::from_millis(10)
        );
    }
}
