//! What a full run reports of its repetitions: the median of each figure.

use super::{Measured, tools};

/// The median of some measurements (the middle one, or the mean of the two middle ones).
pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub(super) fn median_load(loads: &[tools::LoadResult]) -> tools::LoadResult {
    let of = |f: fn(&tools::LoadResult) -> f64| median(loads.iter().map(f).collect());
    tools::LoadResult {
        requests: of(|l| l.requests as f64) as u64,
        per_second: of(|l| l.per_second),
        errors: loads.iter().map(|l| l.errors).sum(),
        latency: tools::Latency {
            p50_us: of(|l| l.latency.p50_us),
            p99_us: of(|l| l.latency.p99_us),
            p999_us: of(|l| l.latency.p999_us),
        },
    }
}

/// Figure by figure, the median of repetitions.
pub(super) fn median_measured(runs: &[Measured]) -> Measured {
    let loads = |f: fn(&Measured) -> tools::LoadResult| {
        median_load(&runs.iter().map(f).collect::<Vec<_>>())
    };
    let of = |f: fn(&Measured) -> f64| median(runs.iter().map(f).collect());
    Measured {
        http_c1: loads(|m| m.http_c1),
        http_c16: loads(|m| m.http_c16),
        cpu_ms_per_1000: of(|m| m.cpu_ms_per_1000),
        http_fixed: loads(|m| m.http_fixed),
        http_close: loads(|m| m.http_close),
        http_close_c1: loads(|m| m.http_close_c1),
        tcp_rr: loads(|m| m.tcp_rr),
        gbps_1: of(|m| m.gbps_1),
        gbps_4: of(|m| m.gbps_4),
        busy_1: of(|m| m.busy_1),
        busy_4: of(|m| m.busy_4),
    }
}
