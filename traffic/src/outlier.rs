//! Outlier detection with Envoy's semantics: an endpoint that fails too many times in a row is
//! ejected at once, for `baseEjectionTime` times the number of times it has been ejected, and
//! comes back when that time is up. No more than `maxEjectionPercent` of a backend's endpoints
//! are ejected at once, but at least one may be. The ejection multiplier falls back by one for
//! every `interval` the endpoint stays in service.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::policy::OutlierSettings;

/// How one attempt to an endpoint ended, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Answered(u16),
    /// No answer: connect failure, reset, timeout (a locally seen failure).
    LocalFailure,
}

/// What outlier detection knows of one endpoint.
#[derive(Debug, Clone, Default)]
pub struct EndpointHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// How many times it was ejected, less one per healthy interval.
    multiplier: u32,
    ejected_until: Option<Instant>,
    /// When the multiplier was last lowered (or the endpoint came back).
    since: Option<Instant>,
    pub ejections_total: u64,
}

/// The endpoint's state, for `/endpoints` and `nodemesh explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    Ejected { seconds_left: u64 },
}

impl EndpointHealth {
    /// Whether the endpoint is out of service at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    pub fn state(&self, now: Instant) -> HealthState {
        match self.ejected_until {
            Some(until) if now < until => HealthState::Ejected {
                seconds_left: until.saturating_duration_since(now).as_secs().max(1),
            },
            _ => HealthState::Healthy,
        }
    }

    /// Counts an outcome. Returns `true` when the endpoint should now be ejected (the caller
    /// checks the backend's ejection limit and then calls [`eject`](Self::eject)).
    pub fn record(&mut self, outcome: Outcome, settings: &OutlierSettings, now: Instant) -> bool {
        self.relax(settings, now);
        if self.is_ejected(now) {
            return false;
        }
        let (is_5xx, is_gateway, is_local) = match outcome {
            Outcome::Answered(code) => (code >= 500, matches!(code, 502..=504), false),
            Outcome::LocalFailure => (false, false, true),
        };
        // Without the split, a local failure counts as a 5xx and as a gateway error (503).
        let (is_5xx, is_gateway) = if is_local && !settings.split_local_origin {
            (true, true)
        } else {
            (is_5xx, is_gateway)
        };
        let bump = |counter: &mut u32, hit: bool| {
            if hit {
                *counter += 1;
            } else {
                *counter = 0;
            }
        };
        bump(&mut self.consecutive_5xx, is_5xx);
        bump(&mut self.consecutive_gateway, is_gateway);
        if settings.split_local_origin {
            match outcome {
                Outcome::LocalFailure => self.consecutive_local += 1,
                // An answer, of any kind, means the endpoint is reachable.
                Outcome::Answered(_) => self.consecutive_local = 0,
            }
        }
        let over = |count: u32, limit: u32| limit > 0 && count >= limit;
        over(self.consecutive_5xx, settings.consecutive_5xx)
            || over(
                self.consecutive_gateway,
                settings.consecutive_gateway_errors,
            )
            || (settings.split_local_origin
                && over(
                    self.consecutive_local,
                    settings.consecutive_local_origin_failures,
                ))
    }

    /// Takes the endpoint out of service.
    pub fn eject(&mut self, settings: &OutlierSettings, now: Instant) {
        self.multiplier += 1;
        self.ejected_until = Some(now + settings.base_ejection_time * self.multiplier);
        self.since = self.ejected_until;
        self.ejections_total += 1;
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_local = 0;
    }

    /// Lowers the multiplier by one per whole interval spent in service since the last change.
    fn relax(&mut self, settings: &OutlierSettings, now: Instant) {
        if self.is_ejected(now) || self.multiplier == 0 || settings.interval.is_zero() {
            return;
        }
        let since = self.since.unwrap_or(now);
        let intervals =
            now.saturating_duration_since(since).as_nanos() / settings.interval.as_nanos();
        if intervals > 0 {
            let steps = u32::try_from(intervals).unwrap_or(u32::MAX);
            self.multiplier = self.multiplier.saturating_sub(steps);
            self.since = Some(since + settings.interval * steps.min(1 << 20));
        }
    }
}

/// Whether one more endpoint may be ejected when `ejected` of `total` already are: at most
/// `max_percent` of them, but at least one, as Envoy.
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    if total == 0 {
        return false;
    }
    let allowed = (total * max_percent as usize) / 100;
    ejected < allowed.max(1)
}

/// How long the ejection of an endpoint ejected `times` times lasts.
pub fn ejection_time(settings: &OutlierSettings, times: u32) -> Duration {
    settings.base_ejection_time * times.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OutlierSettings {
        OutlierSettings {
            split_local_origin: false,
            interval: Duration::from_secs(1),
            consecutive_local_origin_failures: 5,
            consecutive_gateway_errors: 0,
            consecutive_5xx: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 10,
        }
    }

    #[test]
    fn consecutive_5xx_eject_and_a_success_resets_the_count() {
        let s = settings();
        let now = Instant::now();
        let mut health = EndpointHealth::default();
        assert!(!health.record(Outcome::Answered(500), &s, now));
        assert!(!health.record(Outcome::Answered(503), &s, now));
        assert!(
            !health.record(Outcome::Answered(200), &s, now),
            "a success resets"
        );
        assert!(!health.record(Outcome::Answered(500), &s, now));
        assert!(!health.record(Outcome::Answered(500), &s, now));
        assert!(
            health.record(Outcome::Answered(502), &s, now),
            "third in a row"
        );
        health.eject(&s, now);
        assert!(health.is_ejected(now + Duration::from_secs(9)));
        assert!(
            !health.is_ejected(now + Duration::from_secs(10)),
            "back after baseEjectionTime"
        );
        assert_eq!(health.ejections_total, 1);
    }

    #[test]
    fn local_failures_count_as_5xx_unless_split() {
        let mut s = settings();
        let now = Instant::now();
        let mut health = EndpointHealth::default();
        for _ in 0..2 {
            assert!(!health.record(Outcome::LocalFailure, &s, now));
        }
        assert!(health.record(Outcome::LocalFailure, &s, now));
        s.split_local_origin = true;
        s.consecutive_local_origin_failures = 2;
        let mut split = EndpointHealth::default();
        assert!(!split.record(Outcome::LocalFailure, &s, now));
        assert!(
            !split.record(Outcome::Answered(500), &s, now),
            "an answer resets local failures"
        );
        assert!(!split.record(Outcome::LocalFailure, &s, now));
        assert!(split.record(Outcome::LocalFailure, &s, now));
    }

    #[test]
    fn gateway_errors_count_only_502_to_504() {
        let mut s = settings();
        s.consecutive_5xx = 0;
        s.consecutive_gateway_errors = 2;
        let now = Instant::now();
        let mut health = EndpointHealth::default();
        assert!(!health.record(Outcome::Answered(500), &s, now));
        assert!(!health.record(Outcome::Answered(503), &s, now));
        assert!(health.record(Outcome::Answered(504), &s, now));
    }

    #[test]
    fn each_ejection_lasts_longer_and_healthy_intervals_forgive() {
        let s = settings();
        let start = Instant::now();
        let mut health = EndpointHealth::default();
        health.eject(&s, start);
        let back = start + Duration::from_secs(10);
        health.eject(&s, back);
        assert!(
            health.is_ejected(back + Duration::from_secs(19)),
            "the second lasts 2 × 10s"
        );
        assert!(!health.is_ejected(back + Duration::from_secs(20)));
        // 25 healthy intervals later, the multiplier is back to zero: the next lasts 10s.
        let later = back + Duration::from_secs(20 + 25);
        assert!(!health.record(Outcome::Answered(200), &s, later));
        health.eject(&s, later);
        assert!(!health.is_ejected(later + Duration::from_secs(10)));
        assert_eq!(ejection_time(&s, 3), Duration::from_secs(30));
    }

    #[test]
    fn at_most_the_percentage_but_always_one() {
        assert!(may_eject(0, 2, 10), "10 % of 2 rounds down, yet one may go");
        assert!(!may_eject(1, 2, 10));
        assert!(may_eject(1, 2, 100));
        assert!(!may_eject(2, 2, 100), "never more than all");
        assert!(may_eject(4, 10, 50));
        assert!(!may_eject(5, 10, 50));
        assert!(!may_eject(0, 0, 100));
    }
}
