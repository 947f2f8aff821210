//! Per-cgroup counters of every subsystem and the daemon's own health, in
//! one reading ([`Snapshot`]): what the Prometheus/OpenMetrics endpoint
//! exports and what `qosctl top` turns into rates.

use std::{collections::BTreeMap, net::SocketAddr};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

/// Counters of one direction of a cgroup's network class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetMetrics {
    pub bytes: u64,
    pub packets: u64,
    pub drops: u64,
    pub ce_marks: u64,
    pub window_clamps: u64,
    #[serde(default)]
    pub initial_windows: u64,
    /// Guarantee, and what the allocator currently gives (bits/s).
    pub guarantee_bps: u64,
    pub alloc_bps: u64,
    /// Received bytes that neither a receive window nor CE marks held
    /// (ingress without ACK pacing: UDP, mostly).
    #[serde(default)]
    pub unheld_bytes: u64,
    /// Held at its allocation per packet beside such traffic.
    #[serde(default)]
    pub held_at_alloc: bool,
    /// Multiplier of its flows' pacing or, where windows hold received
    /// flows, of their receive windows.
    #[serde(default)]
    pub multiplier: f64,
}

/// A cgroup's disk IO, summed over its devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IoMetrics {
    /// Bytes of the cgroup's writes that reached the block layer (written
    /// back for it, or direct).
    pub written_bytes: u64,
    pub read_bytes: u64,
    pub dirtied_bytes: u64,
    /// Devices on which its writers are paused or its IO is held now.
    pub throttled_devices: u32,
    pub debt_bytes: u64,
}

/// A cgroup's memory under elastic control.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemMetrics {
    pub usage_bytes: u64,
    pub guarantee_bytes: u64,
    /// The elastic cap in force, if any.
    pub cap_bytes: Option<u64>,
    pub reclaimed_bytes: u64,
    pub caps: u64,
    pub kills: u64,
    pub psi_some10: f64,
}

/// Everything measured for one configured cgroup.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CgroupMetrics {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<NetMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<NetMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<IoMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<MemMetrics>,
}

/// The daemon's own health.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub version: String,
    pub uptime_secs: u64,
    pub resident_bytes: u64,
    /// API requests served, and those answered with an error.
    pub requests: u64,
    pub request_errors: u64,
    /// Quotas waiting for their cgroup (or device) to appear.
    pub waiting: u64,
    /// Entries in the datapath's cgroup map (both directions).
    pub net_cgroup_entries: u64,
    /// Duration of the last and the longest network control step (one is
    /// due every 10 ms).
    #[serde(default)]
    pub control_step_last_ms: f64,
    #[serde(default)]
    pub control_step_max_ms: f64,
    /// Degradations: something could not be done and was logged, by kind
    /// (e.g. `net_apply`, `io_apply`, `control_step`).
    pub degradations: BTreeMap<String, u64>,
}

/// One reading.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was read (ms since the Unix epoch): rates are deltas over it.
    pub unix_ms: u64,
    pub daemon: Health,
    /// By cgroup name.
    pub cgroups: BTreeMap<String, CgroupMetrics>,
}

impl Snapshot {
    /// The OpenMetrics text exposition.
    pub fn openmetrics(&self) -> String {
        let mut registry = Registry::with_prefix("qos");
        registry.register_collector(Box::new(SnapshotCollector(self.clone())));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// One metric family: name, help, and its samples by label set.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    counter: bool,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family<'_> {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.samples.is_empty() {
            return Ok(());
        }
        let kind = if self.counter {
            ConstCounter::new(0u64).metric_type()
        } else {
            ConstGauge::new(0f64).metric_type()
        };
        let mut metric = encoder.encode_descriptor(self.name, self.help, None, kind)?;
        for (labels, v) in &self.samples {
            if labels.is_empty() {
                // Unlabelled: one sample, no `{}`.
                if self.counter {
                    ConstCounter::new(*v as u64).encode(metric)?;
                } else {
                    ConstGauge::new(*v).encode(metric)?;
                }
                return Ok(());
            }
            let fam = metric.encode_family(labels)?;
            if self.counter {
                ConstCounter::new(*v as u64).encode(fam)?;
            } else {
                ConstGauge::new(*v).encode(fam)?;
            }
        }
        Ok(())
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let d = &s.daemon;
        let one = |v: f64| vec![(Vec::new(), v)];
        let mut families = vec![
            Family {
                name: "daemon_uptime_seconds",
                help: "Seconds since qosd started.",
                counter: false,
                samples: one(d.uptime_secs as f64),
            },
            Family {
                name: "daemon_resident_bytes",
                help: "Resident memory of qosd.",
                counter: false,
                samples: one(d.resident_bytes as f64),
            },
            Family {
                name: "daemon_requests",
                help: "API requests served.",
                counter: true,
                samples: one(d.requests as f64),
            },
            Family {
                name: "daemon_request_errors",
                help: "API requests answered with an error.",
                counter: true,
                samples: one(d.request_errors as f64),
            },
            Family {
                name: "daemon_waiting_quotas",
                help: "Quotas waiting for their cgroup or device to appear.",
                counter: false,
                samples: one(d.waiting as f64),
            },
            Family {
                name: "daemon_net_cgroup_map_entries",
                help: "Entries in the network datapath's cgroup maps.",
                counter: false,
                samples: one(d.net_cgroup_entries as f64),
            },
            Family {
                name: "daemon_control_step_last_ms",
                help: "Duration of the last network control step (due every 10 ms).",
                counter: false,
                samples: one(d.control_step_last_ms),
            },
            Family {
                name: "daemon_control_step_max_ms",
                help: "Longest network control step since start.",
                counter: false,
                samples: one(d.control_step_max_ms),
            },
            Family {
                name: "daemon_degradations",
                help: "Things qosd could not do and logged, by kind.",
                counter: true,
                samples: d
                    .degradations
                    .iter()
                    .map(|(k, v)| (vec![("kind", escape_label(k))], *v as f64))
                    .collect(),
            },
        ];
        type Pick = fn(&CgroupMetrics) -> Option<f64>;
        let per_cgroup: [(&str, &str, bool, Pick); 25] = [
            ("net_egress_bytes", "Bytes sent.", true, |c| {
                c.egress.map(|n| n.bytes as f64)
            }),
            ("net_egress_packets", "Packets sent.", true, |c| {
                c.egress.map(|n| n.packets as f64)
            }),
            (
                "net_egress_drops",
                "Sent packets dropped (the last resort).",
                true,
                |c| c.egress.map(|n| n.drops as f64),
            ),
            (
                "net_egress_guarantee_bps",
                "Egress guarantee, bits/s.",
                false,
                |c| c.egress.map(|n| n.guarantee_bps as f64),
            ),
            (
                "net_egress_alloc_bps",
                "Egress allocation now (guarantee + borrowed), bits/s.",
                false,
                |c| c.egress.map(|n| n.alloc_bps as f64),
            ),
            ("net_ingress_bytes", "Bytes received.", true, |c| {
                c.ingress.map(|n| n.bytes as f64)
            }),
            ("net_ingress_packets", "Packets received.", true, |c| {
                c.ingress.map(|n| n.packets as f64)
            }),
            (
                "net_ingress_drops",
                "Received packets dropped (the last resort).",
                true,
                |c| c.ingress.map(|n| n.drops as f64),
            ),
            (
                "net_ingress_ce_marks",
                "Received packets marked CE.",
                true,
                |c| c.ingress.map(|n| n.ce_marks as f64),
            ),
            (
                "net_ingress_window_clamps",
                "Receive-window clamps written.",
                true,
                |c| c.ingress.map(|n| n.window_clamps as f64),
            ),
            (
                "net_ingress_initial_windows",
                "Flows accepted with a bounded initial receive window.",
                true,
                |c| c.ingress.map(|n| n.initial_windows as f64),
            ),
            (
                "net_ingress_guarantee_bps",
                "Ingress guarantee, bits/s.",
                false,
                |c| c.ingress.map(|n| n.guarantee_bps as f64),
            ),
            (
                "net_ingress_alloc_bps",
                "Ingress allocation now (guarantee + borrowed), bits/s.",
                false,
                |c| c.ingress.map(|n| n.alloc_bps as f64),
            ),
            (
                "net_ingress_unheld_bytes",
                "Received bytes that neither a receive window nor CE marks held.",
                true,
                |c| c.ingress.map(|n| n.unheld_bytes as f64),
            ),
            (
                "net_ingress_held_at_alloc",
                "1 while the class is held at its allocation per packet beside unheld traffic.",
                false,
                |c| c.ingress.map(|n| f64::from(u8::from(n.held_at_alloc))),
            ),
            (
                "net_ingress_multiplier",
                "Multiplier of the class's ACK pacing or receive windows.",
                false,
                |c| c.ingress.map(|n| n.multiplier),
            ),
            (
                "io_written_bytes",
                "Bytes of the cgroup's writes that reached the block layer.",
                true,
                |c| c.io.map(|i| i.written_bytes as f64),
            ),
            ("io_read_bytes", "Bytes read.", true, |c| {
                c.io.map(|i| i.read_bytes as f64)
            }),
            (
                "io_dirtied_bytes",
                "Page-cache bytes the cgroup dirtied.",
                true,
                |c| c.io.map(|i| i.dirtied_bytes as f64),
            ),
            (
                "io_throttled_devices",
                "Devices on which the cgroup is held now.",
                false,
                |c| c.io.map(|i| f64::from(i.throttled_devices)),
            ),
            ("mem_usage_bytes", "Memory in use.", false, |c| {
                c.mem.map(|m| m.usage_bytes as f64)
            }),
            ("mem_guarantee_bytes", "Memory guarantee.", false, |c| {
                c.mem.map(|m| m.guarantee_bytes as f64)
            }),
            (
                "mem_cap_bytes",
                "Elastic cap in force (absent: none).",
                false,
                |c| c.mem.and_then(|m| m.cap_bytes).map(|v| v as f64),
            ),
            (
                "mem_reclaimed_bytes",
                "Bytes reclaimed by qosd.",
                true,
                |c| c.mem.map(|m| m.reclaimed_bytes as f64),
            ),
            (
                "mem_kills",
                "Times qosd killed the cgroup (emergencies).",
                true,
                |c| c.mem.map(|m| m.kills as f64),
            ),
        ];
        for (name, help, counter, pick) in per_cgroup {
            families.push(Family {
                name,
                help,
                counter,
                samples: s
                    .cgroups
                    .iter()
                    .filter_map(|(cg, m)| Some((vec![("cgroup", escape_label(cg))], pick(m)?)))
                    .collect(),
            });
        }
        for f in &families {
            f.encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// One cgroup's line in `qosctl top`: rates between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TopRow {
    pub cgroup: String,
    /// Bits per second sent and received.
    pub egress_bps: Option<f64>,
    pub ingress_bps: Option<f64>,
    /// Packets per second dropped, marked CE, or clamped, both directions.
    pub net_throttle_per_s: Option<f64>,
    /// Bytes per second that reached the block layer, and read.
    pub io_write_bps: Option<f64>,
    pub io_read_bps: Option<f64>,
    pub io_throttled_devices: Option<u32>,
    pub mem_usage_bytes: Option<u64>,
    pub mem_cap_bytes: Option<u64>,
    pub mem_reclaim_bps: Option<f64>,
}

/// Rates per cgroup between two snapshots of the same daemon (cgroups in
/// `cur`; a counter that went backwards, a restart, counts as zero).
pub fn top_rows(prev: &Snapshot, cur: &Snapshot) -> Vec<TopRow> {
    let secs = (cur.unix_ms.saturating_sub(prev.unix_ms) as f64 / 1000.0).max(1e-3);
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    cur.cgroups
        .iter()
        .map(|(name, c)| {
            let p = prev.cgroups.get(name).cloned().unwrap_or_default();
            let net = |cur: Option<NetMetrics>, prev: Option<NetMetrics>| {
                cur.map(|n| {
                    let p = prev.unwrap_or_default();
                    (
                        rate(p.bytes, n.bytes) * 8.0,
                        rate(
                            p.drops + p.ce_marks + p.window_clamps,
                            n.drops + n.ce_marks + n.window_clamps,
                        ),
                    )
                })
            };
            let eg = net(c.egress, p.egress);
            let ing = net(c.ingress, p.ingress);
            let throttle = match (eg, ing) {
                (None, None) => None,
                (a, b) => Some(a.map_or(0.0, |x| x.1) + b.map_or(0.0, |x| x.1)),
            };
            let io = c.io.map(|i| (i, p.io.unwrap_or_default()));
            let mem = c.mem.map(|m| (m, p.mem.unwrap_or_default()));
            TopRow {
                cgroup: name.clone(),
                egress_bps: eg.map(|x| x.0),
                ingress_bps: ing.map(|x| x.0),
                net_throttle_per_s: throttle,
                io_write_bps: io.map(|(i, p)| rate(p.written_bytes, i.written_bytes)),
                io_read_bps: io.map(|(i, p)| rate(p.read_bytes, i.read_bytes)),
                io_throttled_devices: io.map(|(i, _)| i.throttled_devices),
                mem_usage_bytes: mem.map(|(m, _)| m.usage_bytes),
                mem_cap_bytes: mem.and_then(|(m, _)| m.cap_bytes),
                mem_reclaim_bps: mem.map(|(m, p)| rate(p.reclaimed_bytes, m.reclaimed_bytes)),
            }
        })
        .collect()
}

/// The HTTP endpoint: `GET /metrics` answers the OpenMetrics exposition of
/// a fresh snapshot; anything else is 404 (405 for other methods).
pub struct MetricsServer {
    server: tiny_http::Server,
    addr: SocketAddr,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Binds `addr` (port 0: any free port; see [`MetricsServer::addr`]).
    pub fn bind(addr: SocketAddr) -> Result<Self, String> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| format!("metrics endpoint on {addr}: {e}"))?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        Ok(Self { server, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` is set.
    pub fn serve(&self, snapshot: impl Fn() -> Snapshot, stop: &std::sync::atomic::AtomicBool) {
        use std::sync::atomic::Ordering;
        while !stop.load(Ordering::Relaxed) {
            let req = match self
                .server
                .recv_timeout(std::time::Duration::from_millis(200))
            {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint");
                    continue;
                }
            };
            let response = match (req.method(), req.url()) {
                (tiny_http::Method::Get, "/metrics") => {
                    let text = snapshot().openmetrics();
                    let mut r = tiny_http::Response::from_string(text);
                    if let Ok(h) = tiny_http::Header::from_bytes(
                        "Content-Type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ) {
                        r = r.with_header(h);
                    }
                    r
                }
                (tiny_http::Method::Get, _) => {
                    tiny_http::Response::from_string("not found: try /metrics\n")
                        .with_status_code(404)
                }
                _ => tiny_http::Response::from_string("only GET\n").with_status_code(405),
            };
            let _ = req.respond(response);
        }
    }
}

/// A label value as the exposition format wants it (the encoder writes
/// values verbatim; cgroup names may hold `"`, `\\` or newlines).
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Where the endpoint may listen: loopback unless remote scraping is
/// explicitly allowed.
pub fn check_listen(addr: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(format!(
            "metrics_listen {addr} is not a loopback address; set metrics_allow_remote = true to expose the metrics beyond this host"
        ))
    }
}

/// Resident set size of this process.
pub fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64);
    pages * page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut s = Snapshot {
            unix_ms: 1,
            daemon: Health {
                version: "0.1.0".into(),
                uptime_secs: 5,
                requests: 3,
                degradations: [("net_apply".to_owned(), 2)].into(),
                ..Health::default()
            },
            cgroups: BTreeMap::new(),
        };
        s.cgroups.insert(
            "tenants/a".into(),
            CgroupMetrics {
                egress: Some(NetMetrics {
                    bytes: 1000,
                    guarantee_bps: 100_000_000,
                    ..NetMetrics::default()
                }),
                mem: Some(MemMetrics {
                    usage_bytes: 4096,
                    cap_bytes: None,
                    ..MemMetrics::default()
                }),
                ..CgroupMetrics::default()
            },
        );
        s.cgroups.insert(
            "tenants/c".into(),
            CgroupMetrics {
                ingress: Some(NetMetrics {
                    unheld_bytes: 3000,
                    held_at_alloc: true,
                    multiplier: 1.25,
                    alloc_bps: 200_000_000,
                    ..NetMetrics::default()
                }),
                ..CgroupMetrics::default()
            },
        );
        s.cgroups.insert(
            "b\"quoted\"".into(),
            CgroupMetrics {
                io: Some(IoMetrics {
                    written_bytes: 7,
                    ..IoMetrics::default()
                }),
                ..CgroupMetrics::default()
            },
        );
        s
    }

    #[test]
    fn exposition_has_every_present_sample_and_nothing_absent() {
        let text = sample().openmetrics();
        for line in [
            "# TYPE qos_daemon_requests counter",
            "qos_daemon_requests_total 3\n",
            "qos_daemon_degradations_total{kind=\"net_apply\"} 2",
            "qos_net_egress_bytes_total{cgroup=\"tenants/a\"} 1000",
            "qos_net_egress_guarantee_bps{cgroup=\"tenants/a\"} 100000000",
            "qos_mem_usage_bytes{cgroup=\"tenants/a\"} 4096",
            "qos_io_written_bytes_total{cgroup=\"b\\\"quoted\\\"\"} 7",
            "qos_net_ingress_unheld_bytes_total{cgroup=\"tenants/c\"} 3000",
            "qos_net_ingress_held_at_alloc{cgroup=\"tenants/c\"} 1",
            "qos_net_ingress_multiplier{cgroup=\"tenants/c\"} 1.25",
            "qos_net_ingress_alloc_bps{cgroup=\"tenants/c\"} 200000000",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // No cap in force, no ingress configured for a: no sample at all.
        assert!(!text.contains("qos_mem_cap_bytes{"), "{text}");
        assert!(
            !text.contains("qos_net_ingress_bytes_total{cgroup=\"tenants/a"),
            "{text}"
        );
        assert!(!text.contains("{}"), "{text}");
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let s = sample();
        let back: Snapshot = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn top_rates_are_deltas_over_the_interval() {
        let prev = sample();
        let mut cur = sample();
        cur.unix_ms = prev.unix_ms + 2000;
        let a = cur.cgroups.get_mut("tenants/a").unwrap();
        a.egress.as_mut().unwrap().bytes += 250_000; // 1 Mbit/s over 2 s
        a.egress.as_mut().unwrap().drops += 10;
        cur.cgroups
            .get_mut("b\"quoted\"")
            .unwrap()
            .io
            .as_mut()
            .unwrap()
            .written_bytes += 4 << 20;
        cur.cgroups.insert(
            "new".into(),
            CgroupMetrics {
                ingress: Some(NetMetrics {
                    bytes: 1000,
                    ..NetMetrics::default()
                }),
                ..CgroupMetrics::default()
            },
        );
        let rows = top_rows(&prev, &cur);
        let row = |n: &str| rows.iter().find(|r| r.cgroup == n).unwrap().clone();
        let a = row("tenants/a");
        assert_eq!(a.egress_bps, Some(1_000_000.0));
        assert_eq!(a.net_throttle_per_s, Some(5.0));
        assert_eq!(a.ingress_bps, None);
        assert_eq!(a.io_write_bps, None);
        assert_eq!(a.mem_usage_bytes, Some(4096));
        assert_eq!(
            row("b\"quoted\"").io_write_bps,
            Some(2.0 * (1 << 20) as f64)
        );
        // First seen: counted from zero.
        assert_eq!(row("new").ingress_bps, Some(4000.0));
        // A restart (counters back to zero) is not a negative rate.
        let restarted = top_rows(&cur, &prev);
        assert!(
            restarted
                .iter()
                .all(|r| r.egress_bps.is_none_or(|v| v >= 0.0))
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a/b"), "a/b");
        assert_eq!(escape_label("x\"y\\z\nw"), "x\\\"y\\\\z\\nw");
    }

    #[test]
    fn remote_listening_needs_consent() {
        let lo: SocketAddr = "127.0.0.1:9477".parse().unwrap();
        let lo6: SocketAddr = "[::1]:9477".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9477".parse().unwrap();
        assert!(check_listen(lo, false).is_ok());
        assert!(check_listen(lo6, false).is_ok());
        assert!(
            check_listen(any, false)
                .unwrap_err()
                .contains("not a loopback")
        );
        assert!(check_listen(any, true).is_ok());
    }

    #[test]
    fn endpoint_serves_metrics_and_refuses_the_rest() {
        use std::{
            io::{Read, Write},
            sync::{Arc, atomic::AtomicBool},
        };
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || server.serve(sample, &s2));
        let get = |req: &str| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        assert!(
            ok.contains("qos_net_egress_bytes_total{cgroup=\"tenants/a\"} 1000"),
            "{ok}"
        );
        assert!(get("GET / HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
        assert!(
            get("POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n").starts_with("HTTP/1.0 405")
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
    }

    #[test]
    fn resident_size_is_read() {
        assert!(resident_bytes() > 0);
    }
}
