//! Scenarios and figures of the bandwidth fairness script (pure parts).

use serde::{Deserialize, Serialize};

/// How a group's sender behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Demand {
    Busy,
    Idle,
    /// Busy for the first third, idle for the second, busy again.
    OnOff,
}

/// One cgroup of a scenario. Rates are in per-mille of the capacity, so a
/// scenario keeps its shape at any `--capacity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    pub name: &'static str,
    pub quota_permille: u64,
    pub ceil_permille: Option<u64>,
    pub priority: u32,
    pub demand: Demand,
    pub flows: u32,
    pub udp: bool,
    /// TCP senders negotiate ECN (ingress scenarios: the peer's senders).
    pub ecn: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub groups: Vec<GroupSpec>,
    /// Senders in their own network namespaces (containers).
    pub containers: bool,
    /// Ingress runs: a small request/response probe shares the first
    /// group's cgroup (and address) with its bulk traffic.
    pub rr_probe: bool,
}

const fn g(name: &'static str, quota: u64, priority: u32, demand: Demand) -> GroupSpec {
    GroupSpec {
        name,
        quota_permille: quota,
        ceil_permille: None,
        priority,
        demand,
        flows: 1,
        udp: false,
        ecn: true,
    }
}

/// The ingress scenarios: the eight egress ones with the receivers in the
/// cgroups, plus an incast and a sender without ECN.
pub fn ingress_scenarios() -> Vec<Scenario> {
    use Demand::*;
    let mut v = scenarios();
    v.push(Scenario {
        name: "incast",
        about: "16 senders into one cgroup next to a guaranteed one, equal quotas",
        groups: vec![
            GroupSpec {
                flows: 16,
                ..g("incast", 500, 0, Busy)
            },
            g("guaranteed", 500, 0, Busy),
        ],
        containers: false,
        rr_probe: false,
    });
    v.push(Scenario {
        name: "no-ecn",
        about: "a sender without ECN (window clamp, then drops) next to an ECN sender, 30/70 %",
        groups: vec![
            GroupSpec {
                ecn: false,
                ..g("plain", 300, 0, Busy)
            },
            g("ecn", 700, 0, Busy),
        ],
        containers: false,
        rr_probe: false,
    });
    v
}

/// The eight egress scenarios.
pub fn scenarios() -> Vec<Scenario> {
    use Demand::*;
    vec![
        Scenario {
            name: "all-busy",
            about: "quotas 10/30/60 % of capacity, all busy: each gets its quota",
            groups: vec![
                g("a", 100, 0, Busy),
                g("b", 300, 0, Busy),
                g("c", 600, 0, Busy),
            ],
            containers: false,
            rr_probe: true,
        },
        Scenario {
            name: "one-idle",
            about: "c idle: a and b share its quota 1:3",
            groups: vec![
                g("a", 100, 0, Busy),
                g("b", 300, 0, Busy),
                g("c", 600, 0, Idle),
            ],
            containers: false,
            rr_probe: false,
        },
        Scenario {
            name: "priority",
            about: "c idle: spare goes to a (priority 0) up to its 50 % ceiling, the rest to b (priority 1)",
            groups: vec![
                GroupSpec {
                    ceil_permille: Some(500),
                    ..g("a", 100, 0, Busy)
                },
                g("b", 300, 1, Busy),
                g("c", 600, 0, Idle),
            ],
            containers: false,
            rr_probe: false,
        },
        Scenario {
            name: "proportional",
            about: "quotas 1:2:3 (60 % in all), equal priority, all greedy: spare shared 1:2:3",
            groups: vec![
                g("a", 100, 0, Busy),
                g("b", 200, 0, Busy),
                g("c", 300, 0, Busy),
            ],
            containers: false,
            rr_probe: false,
        },
        Scenario {
            name: "on-off",
            about: "c goes idle for a third of the run and comes back: it must regain its quota quickly",
            groups: vec![
                g("a", 100, 0, Busy),
                g("b", 300, 0, Busy),
                g("c", 600, 0, OnOff),
            ],
            containers: false,
            rr_probe: false,
        },
        Scenario {
            name: "many-flows",
            about: "32 flows against 1 flow, equal quotas: equal shares",
            groups: vec![
                GroupSpec {
                    flows: 32,
                    ..g("many", 400, 0, Busy)
                },
                g("one", 400, 0, Busy),
            ],
            containers: false,
            rr_probe: false,
        },
        Scenario {
            name: "udp",
            about: "a UDP sender offering the whole capacity against a TCP cgroup, equal quotas",
            groups: vec![
                GroupSpec {
                    udp: true,
                    ..g("udp", 500, 0, Busy)
                },
                g("tcp", 500, 0, Busy),
            ],
            containers: false,
            rr_probe: false,
        },
        Scenario {
            name: "containers",
            about: "all-busy with every sender in its own network namespace behind a veth, routed out",
            groups: vec![
                g("a", 100, 0, Busy),
                g("b", 300, 0, Busy),
                g("c", 600, 0, Busy),
            ],
            containers: true,
            rr_probe: true,
        },
    ]
}

/// p-th percentile (0..=100) by nearest rank; None for no samples.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}

/// Jain's fairness index of `xs` (1 = perfectly even).
pub fn jain(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if sq == 0.0 {
        return None;
    }
    Some(sum * sum / (xs.len() as f64 * sq))
}

/// A rate over time: (window start s, window end s, bits per second).
pub type Windows = Vec<(f64, f64, f64)>;

/// Milliseconds from `t_on` until the end of the first window at or above
/// `target` bits/s that starts no earlier than `t_on - 0.1` s.
pub fn recovery_ms(w: &Windows, t_on: f64, target: f64) -> Option<f64> {
    w.iter()
        .filter(|(a, _, _)| *a >= t_on - 0.1)
        .find(|(_, _, r)| *r >= target)
        .map(|(_, b, _)| ((b - t_on) * 1000.0).max(0.0))
}

/// The windows that lie within [from, to].
fn within(w: &Windows, from: f64, to: f64) -> impl Iterator<Item = &(f64, f64, f64)> {
    w.iter()
        .filter(move |(a, b, _)| *a >= from - 1e-9 && *b <= to + 1e-9)
}

/// Mean bits per second over the windows that lie within [from, to].
pub fn mean_between(w: &Windows, from: f64, to: f64) -> f64 {
    let (bits, secs) = within(w, from, to).fold((0.0, 0.0), |(bits, secs), (a, b, r)| {
        (bits + r * (b - a), secs + (b - a))
    });
    if secs > 0.0 { bits / secs } else { 0.0 }
}

/// Rates of the windows that lie within [from, to].
pub fn rates_between(w: &Windows, from: f64, to: f64) -> Vec<f64> {
    within(w, from, to).map(|w| w.2).collect()
}

/// Bits the windows carried within [from, to], a window that straddles an
/// end counted for its part inside (a span whose ends do not fall on the
/// windows' grid loses nothing).
pub fn bits_between(w: &Windows, from: f64, to: f64) -> f64 {
    w.iter()
        .map(|(a, b, r)| r * (b.min(to) - a.max(from)).max(0.0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_between_counts_the_part_of_a_window_inside() {
        let w: Windows = vec![(0.0, 0.1, 1000.0), (0.1, 0.2, 2000.0), (0.2, 0.3, 4000.0)];
        let near = |x: f64, y: f64| (x - y).abs() < 1e-9;
        assert!(near(bits_between(&w, 0.0, 0.3), 700.0));
        // Half of the first window, all of the second, a quarter of the third.
        assert!(near(bits_between(&w, 0.05, 0.225), 50.0 + 200.0 + 100.0));
        assert_eq!(bits_between(&w, 0.4, 1.0), 0.0);
    }

    #[test]
    fn scenario_set_is_complete_and_admissible() {
        let names: Vec<_> = scenarios().iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "all-busy",
                "one-idle",
                "priority",
                "proportional",
                "on-off",
                "many-flows",
                "udp",
                "containers"
            ]
        );
        for s in scenarios() {
            let total: u64 = s.groups.iter().map(|g| g.quota_permille).sum();
            assert!(total <= 1000, "{} guarantees {total}‰", s.name);
        }
    }

    #[test]
    fn statistics() {
        assert_eq!(percentile(&[], 5.0), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 5.0), Some(5.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 5.0), Some(3.0));
        assert_eq!(jain(&[1.0, 1.0, 1.0]), Some(1.0));
        let j = jain(&[1.0, 0.0]).expect("jain");
        assert!((j - 0.5).abs() < 1e-9);
        assert_eq!(jain(&[0.0]), None);
    }

    #[test]
    fn windows() {
        let w: Windows = vec![
            (0.0, 0.1, 0.0),
            (0.1, 0.2, 50.0),
            (0.2, 0.3, 100.0),
            (0.3, 0.4, 100.0),
        ];
        assert_eq!(recovery_ms(&w, 0.15, 100.0).map(|r| r.round()), Some(150.0));
        assert_eq!(recovery_ms(&w, 0.15, 1000.0), None);
        assert!((mean_between(&w, 0.2, 0.4) - 100.0).abs() < 1e-9);
        assert_eq!(rates_between(&w, 0.1, 0.3), vec![50.0, 100.0]);
    }
}
