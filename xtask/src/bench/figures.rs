//! The results table's figures: which value of a case's measurements each row shows, in what
//! unit, which way is better, and the target it has across nodes.

use super::{
    Measured,
    report::{Pair, Row},
};

/// One row of the table.
struct Figure {
    /// Its name; `{rate}` stands for the fixed request rate.
    name: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    /// What nodemesh aims at across nodes.
    target: Option<&'static str>,
    value: fn(&Measured) -> f64,
}

const FIGURES: [Figure; 19] = [
    Figure {
        name: "HTTP keep-alive, 1 connection: p50",
        unit: "µs",
        higher_is_better: false,
        target: Some("added ≤ +30 µs on a 28 µs baseline, about 2.1x (ztunnel 3.9x)"),
        value: |m| m.http_c1.latency.p50_us,
    },
    Figure {
        name: "HTTP keep-alive, 1 connection: p99",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.http_c1.latency.p99_us,
    },
    Figure {
        name: "HTTP at {rate} req/s: p50",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.http_fixed.latency.p50_us,
    },
    Figure {
        name: "HTTP at {rate} req/s: p99",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.http_fixed.latency.p99_us,
    },
    Figure {
        name: "HTTP at {rate} req/s: p99.9",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.http_fixed.latency.p999_us,
    },
    Figure {
        name: "HTTP keep-alive, 16 connections: throughput",
        unit: "req/s",
        higher_is_better: true,
        target: Some("≥ 0.6x (ztunnel 0.26x)"),
        value: |m| m.http_c16.per_second,
    },
    Figure {
        name: "HTTP at the highest rate (16 conn.): p50",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.http_c16.latency.p50_us,
    },
    Figure {
        name: "HTTP at the highest rate (16 conn.): p99",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.http_c16.latency.p99_us,
    },
    Figure {
        name: "HTTP at the highest rate (16 conn.): p99.9",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.http_c16.latency.p999_us,
    },
    Figure {
        name: "HTTP Connection: close (4 conn.): new connections",
        unit: "conn/s",
        higher_is_better: true,
        target: Some("≥ 0.5x (ztunnel 0.19x)"),
        value: |m| m.http_close.per_second,
    },
    Figure {
        name: "HTTP Connection: close, 1 connection: p50",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.http_close_c1.latency.p50_us,
    },
    Figure {
        name: "TCP request/response (sockperf): p50",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.tcp_rr.latency.p50_us,
    },
    Figure {
        name: "TCP request/response (sockperf): p99",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.tcp_rr.latency.p99_us,
    },
    Figure {
        name: "TCP request/response (sockperf): p99.9",
        unit: "µs",
        higher_is_better: false,
        target: None,
        value: |m| m.tcp_rr.latency.p999_us,
    },
    Figure {
        name: "TCP throughput, 1 stream (iperf3)",
        unit: "Gbit/s",
        higher_is_better: true,
        target: Some("≥ 0.5x (ztunnel 0.22x)"),
        value: |m| m.gbps_1,
    },
    Figure {
        name: "TCP throughput, 4 streams (iperf3)",
        unit: "Gbit/s",
        higher_is_better: true,
        target: Some("mesh ≥ 1.5 × its one stream"),
        value: |m| m.gbps_4,
    },
    Figure {
        name: "host CPU busy during iperf3, 1 stream",
        unit: "% of all CPUs",
        higher_is_better: false,
        target: None,
        value: |m| m.busy_1,
    },
    Figure {
        name: "host CPU busy during iperf3, 4 streams",
        unit: "% of all CPUs",
        higher_is_better: false,
        target: None,
        value: |m| m.busy_4,
    },
    Figure {
        name: "host CPU per 1000 requests (16 conn.)",
        unit: "ms",
        higher_is_better: false,
        target: Some("≤ 1.8x (ztunnel 3.7x)"),
        value: |m| m.cpu_ms_per_1000,
    },
];

/// Every figure's row from the repetitions of the four cases, in the order same node without
/// and with the mesh, then across nodes without and with it.
pub(super) fn rows(runs: &[Vec<Measured>; 4], rate: u32) -> Vec<Row> {
    FIGURES
        .iter()
        .map(|figure| {
            let each = |case: &[Measured]| case.iter().map(figure.value).collect::<Vec<f64>>();
            Row {
                figure: figure.name.replace("{rate}", &rate.to_string()),
                unit: figure.unit,
                higher_is_better: figure.higher_is_better,
                same_node: Pair::of(each(&runs[0]), each(&runs[1])),
                cross_node: Pair::of(each(&runs[2]), each(&runs[3])),
                target: figure.target,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(c16: f64, gbps_1: f64) -> Measured {
        let mut m = Measured {
            gbps_1,
            ..Measured::default()
        };
        m.http_c16.per_second = c16;
        m
    }

    #[test]
    fn each_row_takes_its_value_from_the_right_case_and_names_the_rate() {
        let runs = [
            vec![measured(100.0, 1.0)],
            vec![measured(50.0, 0.5)],
            vec![measured(200.0, 10.0), measured(220.0, 12.0)],
            vec![measured(120.0, 4.0), measured(100.0, 6.0)],
        ];
        let rows = rows(&runs, 1000);
        assert_eq!(rows.len(), FIGURES.len());
        let row = |name: &str| {
            rows.iter()
                .find(|r| r.figure == name)
                .unwrap_or_else(|| panic!("no row {name}"))
        };
        let c16 = row("HTTP keep-alive, 16 connections: throughput");
        assert_eq!((c16.same_node.no_mesh, c16.same_node.mesh), (100.0, 50.0));
        assert_eq!(
            (c16.cross_node.no_mesh, c16.cross_node.mesh),
            (210.0, 110.0)
        );
        assert_eq!(c16.cross_node.mesh_runs, [120.0, 100.0]);
        assert!(c16.higher_is_better);
        let stream = row("TCP throughput, 1 stream (iperf3)");
        assert_eq!(
            (stream.cross_node.no_mesh, stream.cross_node.mesh),
            (11.0, 5.0)
        );
        assert_eq!(stream.target, Some("≥ 0.5x (ztunnel 0.22x)"));
        assert!(!row("HTTP at 1000 req/s: p99.9").higher_is_better);
        assert!(rows.iter().all(|r| !r.figure.contains('{')));
    }
}
