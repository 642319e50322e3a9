//! Linkerd's retry budget: retries may add at most `percent` of the original requests of the
//! last `ttl`, plus `minRetriesPerSecond`. Two pools: the share earned by requests, over a
//! window of `ttl` in ten slots, and the minimum, accruing by the second (at most one second's
//! worth kept), so that over any stretch of T seconds the retries stay within
//! `percent × requests + minRetriesPerSecond × (T + 1)`, whatever the retry policy says.

use std::time::{Duration, Instant};

use crate::policy::BudgetSettings;

const SLOTS: usize = 10;

#[derive(Debug, Clone)]
pub struct RetryBudget {
    settings: BudgetSettings,
    /// Per slot: requests deposited, retries drawn from their share.
    deposits: [u32; SLOTS],
    drawn: [u32; SLOTS],
    slot: usize,
    slot_started: Instant,
    /// The minimum's tokens, and when they were last topped up.
    minimum: f64,
    minimum_at: Instant,
}

impl RetryBudget {
    pub fn new(settings: BudgetSettings, now: Instant) -> Self {
        Self {
            settings,
            deposits: [0; SLOTS],
            drawn: [0; SLOTS],
            slot: 0,
            slot_started: now,
            minimum: f64::from(settings.min_retries_per_second),
            minimum_at: now,
        }
    }

    pub fn settings(&self) -> BudgetSettings {
        self.settings
    }

    fn slot_length(&self) -> Duration {
        (self.settings.ttl / SLOTS as u32).max(Duration::from_millis(1))
    }

    /// Moves the window forward to `now`, forgetting slots older than `ttl`.
    fn advance(&mut self, now: Instant) {
        let length = self.slot_length();
        let mut elapsed = now.saturating_duration_since(self.slot_started);
        let mut steps = 0;
        while elapsed >= length && steps < SLOTS {
            self.slot = (self.slot + 1) % SLOTS;
            self.deposits[self.slot] = 0;
            self.drawn[self.slot] = 0;
            elapsed -= length;
            steps += 1;
        }
        if steps == SLOTS {
            // Idle for longer than the window: start afresh.
            self.slot_started = now;
        } else {
            self.slot_started += length * steps as u32;
        }
        let rate = f64::from(self.settings.min_retries_per_second);
        let accrued = now.saturating_duration_since(self.minimum_at).as_secs_f64() * rate;
        self.minimum = (self.minimum + accrued).min(rate);
        self.minimum_at = now;
    }

    /// An original request: it earns its share of retries.
    pub fn deposit(&mut self, now: Instant) {
        self.advance(now);
        self.deposits[self.slot] = self.deposits[self.slot].saturating_add(1);
    }

    /// Whether one more retry is allowed now (and spends it).
    pub fn withdraw(&mut self, now: Instant) -> bool {
        self.advance(now);
        let deposits: u64 = self.deposits.iter().map(|&d| u64::from(d)).sum();
        let drawn: u64 = self.drawn.iter().map(|&d| u64::from(d)).sum();
        let earned = deposits * u64::from(self.settings.percent) / 100;
        if drawn < earned {
            self.drawn[self.slot] += 1;
            return true;
        }
        if self.minimum >= 1.0 {
            self.minimum -= 1.0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(percent: u32, min: u32) -> BudgetSettings {
        BudgetSettings {
            percent,
            min_retries_per_second: min,
            ttl: Duration::from_secs(10),
        }
    }

    /// 100 requests a second for `seconds`, each wanting `retries` retries; returns the
    /// retries allowed.
    fn failing_load(budget: &mut RetryBudget, start: Instant, seconds: u64, retries: u32) -> u64 {
        let mut allowed = 0;
        for i in 0..seconds * 100 {
            let now = start + Duration::from_millis(i * 10);
            budget.deposit(now);
            for _ in 0..retries {
                if budget.withdraw(now) {
                    allowed += 1;
                }
            }
        }
        allowed
    }

    #[test]
    fn retries_stay_within_the_share_plus_the_minimum() {
        let start = Instant::now();
        let mut budget = RetryBudget::new(settings(20, 10), start);
        let allowed = failing_load(&mut budget, start, 10, 3);
        // 20 % of 1000 requests, plus 10 a second for 10 s (and the first second's 10).
        assert!(allowed <= 200 + 100 + 10, "{allowed}");
        assert!(
            allowed >= 200 + 90,
            "the budget gives what it promises: {allowed}"
        );
        // Over a longer run the share follows the window: 20 % + 10/s.
        let mut long = RetryBudget::new(settings(20, 10), start);
        let allowed = failing_load(&mut long, start, 60, 3);
        assert!(allowed <= 1200 + 600 + 10, "{allowed}");
    }

    #[test]
    fn without_a_share_only_the_minimum_is_left() {
        let start = Instant::now();
        let mut budget = RetryBudget::new(settings(0, 2), start);
        assert!(budget.withdraw(start));
        assert!(budget.withdraw(start));
        assert!(!budget.withdraw(start), "two a second");
        assert!(
            budget.withdraw(start + Duration::from_millis(500)),
            "one more after half a second"
        );
        assert!(!budget.withdraw(start + Duration::from_millis(500)));
        let mut none = RetryBudget::new(settings(0, 0), start);
        assert!(
            !none.withdraw(start + Duration::from_secs(5)),
            "no retries at all"
        );
    }

    #[test]
    fn earned_retries_expire_with_their_window() {
        let start = Instant::now();
        let mut budget = RetryBudget::new(settings(100, 0), start);
        for _ in 0..5 {
            budget.deposit(start);
        }
        let later = start + Duration::from_secs(11);
        assert!(
            !budget.withdraw(later),
            "deposits older than ttl earn nothing"
        );
        budget.deposit(later);
        assert!(budget.withdraw(later));
        assert!(!budget.withdraw(later));
    }
}
