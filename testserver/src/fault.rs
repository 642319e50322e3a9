//! The fault switch: `PUT /fault` with `{"status": 503, "ratio": 1.0, "count": null,
//! "delayMs": 0}` makes later requests fail that way with that probability (or only the next
//! `count` of them), `DELETE /fault` clears it, `GET /fault` shows it. And the count of
//! requests answered, for the `x-served` header.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// What a faulty request gets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// The status to answer with; absent: answer normally (after the delay).
    #[serde(default)]
    pub status: Option<u16>,
    /// The share of requests that fail, 0 to 1.
    #[serde(default = "always")]
    pub ratio: f64,
    /// Only the next `count` requests fail; absent: every request (by `ratio`) until cleared.
    #[serde(default)]
    pub count: Option<u64>,
    /// Wait this long before answering a faulty request.
    #[serde(default)]
    pub delay_ms: u64,
}

fn always() -> f64 {
    1.0
}

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected {
    pub status: Option<u16>,
    pub delay: Duration,
}

#[derive(Debug, Default)]
pub struct FaultSwitch {
    fault: Mutex<Option<Fault>>,
    served: AtomicU64,
}

impl FaultSwitch {
    pub const fn new() -> Self {
        Self {
            fault: Mutex::new(None),
            served: AtomicU64::new(0),
        }
    }

    pub fn set(&self, fault: Fault) -> Result<(), String> {
        if !(0.0..=1.0).contains(&fault.ratio) {
            return Err(format!("ratio {} is not between 0 and 1", fault.ratio));
        }
        if let Some(status) = fault.status
            && !(100..=999).contains(&status)
        {
            return Err(format!("{status} is not a status code"));
        }
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(fault);
        Ok(())
    }

    pub fn clear(&self) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn get(&self) -> Option<Fault> {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request and decides its fault; `draw` is uniform in [0, 1).
    pub fn next(&self, draw: f64) -> (u64, Option<Injected>) {
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        let Some(current) = fault.as_mut() else {
            return (served, None);
        };
        if draw >= current.ratio {
            return (served, None);
        }
        let injected = Injected {
            status: current.status,
            delay: Duration::from_millis(current.delay_ms),
        };
        if let Some(count) = current.count.as_mut() {
            *count = count.saturating_sub(1);
            if *count == 0 {
                *fault = None;
            }
        }
        (served, Some(injected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(json: &str) -> Fault {
        serde_json::from_str(json).expect("fault")
    }

    #[test]
    fn a_count_fails_only_the_next_requests() {
        let switch = FaultSwitch::default();
        switch
            .set(fault(r#"{"status": 503, "count": 1}"#))
            .expect("set");
        assert_eq!(
            switch.next(0.0),
            (
                1,
                Some(Injected {
                    status: Some(503),
                    delay: Duration::ZERO
                })
            )
        );
        assert_eq!(switch.next(0.0), (2, None), "only the next one");
        assert_eq!(switch.get(), None);
    }

    #[test]
    fn a_ratio_fails_that_share_until_cleared() {
        let switch = FaultSwitch::default();
        switch
            .set(fault(r#"{"status": 500, "ratio": 0.5, "delayMs": 20}"#))
            .expect("set");
        assert!(switch.next(0.2).1.is_some());
        assert!(switch.next(0.7).1.is_none());
        assert_eq!(
            switch.next(0.1).1.map(|i| i.delay),
            Some(Duration::from_millis(20))
        );
        switch.clear();
        assert_eq!(switch.next(0.0), (4, None));
    }

    #[test]
    fn nonsense_is_refused() {
        let switch = FaultSwitch::default();
        assert!(switch.set(fault(r#"{"status": 503, "ratio": 2}"#)).is_err());
        assert!(switch.set(fault(r#"{"status": 42}"#)).is_err());
        assert!(
            serde_json::from_str::<Fault>(r#"{"statuss": 503}"#).is_err(),
            "typos are refused"
        );
    }
}
