//! Choosing an endpoint: power of two choices over a cost (peak-EWMA latency times requests in
//! flight, as Linkerd's balancer), round robin, random, and consistent hashing by rendezvous
//! (highest random weight), which moves only the keys of an endpoint that comes or goes and
//! gives every node proxy the same answer for the same key.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

/// Latency estimate that rises at once to a slower observation and decays toward faster ones,
/// so an endpoint that starts to lag is avoided quickly and forgiven gradually.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    value_ns: f64,
    stamp: Instant,
}

/// How fast an estimate forgets: Linkerd's default.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint nothing is known about yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        Self {
            value_ns: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
        }
    }

    /// The estimate at `now`.
    pub fn get(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        self.value_ns * (-elapsed / EWMA_DECAY.as_nanos() as f64).exp()
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.get(now);
        self.value_ns = if rtt > current {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
            let weight = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            current * weight + rtt * (1.0 - weight)
        };
        self.stamp = now;
    }
}

/// Linkerd's cost of an endpoint: its latency estimate times the requests it would then have
/// in flight.
pub fn cost(ewma_ns: f64, in_flight: u64) -> f64 {
    ewma_ns.max(1.0) * (in_flight as f64 + 1.0)
}

/// Power of two choices: of two distinct candidates drawn at random, the cheaper.
/// `draws` are two uniform random numbers. Returns an index into `candidates`.
pub fn p2c(candidates: usize, draws: (u64, u64), cost: impl Fn(usize) -> f64) -> usize {
    match candidates {
        0 | 1 => 0,
        n => {
            let a = (draws.0 % n as u64) as usize;
            let mut b = (draws.1 % (n as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            if cost(b) < cost(a) { b } else { a }
        }
    }
}

/// A stable 64-bit hash (FNV-1a, then a finaliser that spreads the bits): the same on every
/// node, unlike std's randomly keyed hasher.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    mix(hash)
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Rendezvous hashing: the candidate whose address scores highest with the key. Returns an
/// index into `candidates`.
pub fn rendezvous(key: u64, candidates: &[Ipv4Addr]) -> usize {
    candidates
        .iter()
        .enumerate()
        .max_by_key(|(_, ip)| mix(key ^ stable_hash(&ip.octets())))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let start = Instant::now();
        let mut ewma = PeakEwma::new(start);
        ewma.observe(Duration::from_millis(100), start);
        assert_eq!(ewma.get(start), 100e6, "a slow answer counts at once");
        let later = start + EWMA_DECAY;
        let decayed = ewma.get(later);
        assert!(
            (decayed - 100e6 / std::f64::consts::E).abs() < 1.0,
            "{decayed}"
        );
        ewma.observe(Duration::from_millis(1), later);
        let after = ewma.get(later);
        assert!(
            after < decayed && after > 1e6,
            "a fast answer pulls it down gradually: {after}"
        );
    }

    #[test]
    fn p2c_takes_the_cheaper_of_two_distinct_candidates() {
        let costs = [5.0, 1.0, 3.0];
        assert_eq!(p2c(3, (0, 0), |i| costs[i]), 1, "0 and 1: 1 is cheaper");
        assert_eq!(p2c(3, (2, 0), |i| costs[i]), 2, "2 and 0: 2 is cheaper");
        for a in 0..3 {
            for b in 0..2 {
                let chosen = p2c(3, (a, b), |i| costs[i]);
                assert_ne!(
                    chosen, 0,
                    "the dearest never wins against another candidate"
                );
            }
        }
        assert_eq!(p2c(1, (9, 9), |_| 0.0), 0);
        assert_eq!(cost(2e6, 0), 2e6);
        assert_eq!(
            cost(2e6, 3),
            8e6,
            "requests in flight make an endpoint dearer"
        );
    }

    #[test]
    fn rendezvous_is_stable_and_moves_only_the_keys_of_a_removed_endpoint() {
        let all: Vec<Ipv4Addr> = (1..=5).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let without_third: Vec<Ipv4Addr> = all
            .iter()
            .copied()
            .filter(|ip| ip.octets()[3] != 3)
            .collect();
        let mut moved = 0;
        let mut counts = [0usize; 5];
        for key in 0..1000u64 {
            let key = stable_hash(&key.to_le_bytes());
            let before = all[rendezvous(key, &all)];
            counts[usize::from(before.octets()[3]) - 1] += 1;
            let after = without_third[rendezvous(key, &without_third)];
            if before != after {
                moved += 1;
                assert_eq!(
                    before.octets()[3],
                    3,
                    "only keys of the removed endpoint move"
                );
            }
            assert_eq!(
                all[rendezvous(key, &all)],
                before,
                "same key, same endpoint"
            );
        }
        assert!(
            moved > 100 && moved < 300,
            "about a fifth of the keys moved: {moved}"
        );
        assert!(
            counts.iter().all(|&c| c > 120),
            "keys spread over all endpoints: {counts:?}"
        );
        assert_eq!(stable_hash(b"user-1"), stable_hash(b"user-1"));
    }
}
