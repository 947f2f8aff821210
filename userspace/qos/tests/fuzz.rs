//! Hostile input, property-based: the config parser, the socket API's
//! request decoding and the validation each request goes through, the
//! unit parsers and the mountinfo parser get inputs mutated from valid
//! ones (byte flips, inserted tokens, cut and repeated ranges, spliced
//! seeds) and plain garbage. None may panic; every refusal says why; what
//! is accepted is sane (units round-trip, cgroup names stay in the tree).
//!
//! `QOS_FUZZ_CASES` executions per target (default 2,000; `scripts/fuzz`
//! runs 1,000,000 each in release and records them in results/fuzz).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure panics"
)]

use std::path::Path;

use proptest::{
    prelude::*,
    test_runner::{Config as ProptestConfig, TestCaseError},
};
use qos::{config::Config, protocol::Request};
use qos_core::{Hierarchy, Rate, Size};
use testbeds::fuzz::mutated;

fn cases() -> u32 {
    std::env::var("QOS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // A failure is reported with its input; no files, no shrinking
        // marathon over a million cases.
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

const CONFIG_SEEDS: &[&str] = &[
    include_str!("../../../packaging/qosd.toml"),
    "[daemon]\nsocket = \"/run/q.sock\"\nmetrics_listen = \"127.0.0.1:9477\"\n[net]\ninterface = \"eth0\"\negress_capacity = \"1gbit\"\ningress_capacity = \"900mbit\"\n[[net.quota]]\ncgroup = \"a\"\nrate = \"100mbit\"\nceil = \"200mbit\"\npriority = 3\ningress_rate = \"10mbit\"\n",
    "[mem]\nenabled = true\nreserve = \"1GiB\"\n[[mem.quota]]\ncgroup = \"a/b\"\nguarantee = \"2GiB\"\nlimit = \"4GiB\"\npriority = 7\n[mem.tuning]\ntight_free_pct = 12.5\n",
    "[io]\nenabled = true\ninterval_ms = 100\n[[io.limit]]\ncgroup = \"a\"\ndevice = \"8:16\"\nwrite_bps = \"20MiB\"\nread_iops = 500\nweight = 100\n",
];

const REQUEST_SEEDS: &[&str] = &[
    r#"{"op":"status"}"#,
    r#"{"op":"metrics"}"#,
    r#"{"op":"net_set","cgroup":"tenants/a","rate":"100mbit","ceil":"1gbit","priority":2,"ingress_rate":"50mbit","ingress_ceil":"60mbit"}"#,
    r#"{"op":"net_unset","cgroup":"/sys/fs/cgroup/tenants/a"}"#,
    r#"{"op":"mem_set","cgroup":"tenants/a","guarantee":"1GiB","limit":"2GiB","priority":7}"#,
    r#"{"op":"io_set","cgroup":"tenants/a","device":"8:16","write_bps":"20MiB","read_iops":100,"weight":500}"#,
    r#"{"op":"io_unset","cgroup":"a","device":"/dev/loop0"}"#,
    r#"{"op":"net_show"}"#,
];

const UNIT_SEEDS: &[&str] = &[
    "10mbit",
    "1.5gbit",
    "800kbit",
    "10mbps",
    "1000",
    "0",
    "512MiB",
    "4G",
    "1.5TiB",
    "20MiB/s",
    "512KiB/s",
    "8:16",
    "/dev/loop3",
    "1048576",
];

const MOUNTINFO_SEEDS: &[&str] = &[
    "29 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
    "30 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n31 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n32 25 0:29 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio\n",
];

fn fixture() -> Hierarchy {
    Hierarchy::from_mountinfo(MOUNTINFO_SEEDS[1]).expect("fixture mountinfo")
}

/// Runs `check` over `cases()` inputs from `strategy`, counting the
/// executions and the inputs the parser accepted (`check` says: how deep
/// the mutations reach); with `QOS_FUZZ_REPORT` set, appends a JSON line
/// (target, executions, accepted, seconds) to that file.
fn fuzz<S: Strategy>(
    target: &str,
    strategy: S,
    check: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) {
    let executions = std::cell::Cell::new(0u64);
    let accepted = std::cell::Cell::new(0u64);
    let start = std::time::Instant::now();
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let result = runner.run(&strategy, |input| {
        executions.set(executions.get() + 1);
        if check(input)? {
            accepted.set(accepted.get() + 1);
        }
        Ok(())
    });
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{target}: {} executions ({} accepted) in {secs:.1} s",
        executions.get(),
        accepted.get()
    );
    if let Ok(path) = std::env::var("QOS_FUZZ_REPORT") {
        use std::io::Write;
        let line = serde_json::json!({
            "target": target,
            "executions": executions.get(),
            "accepted": accepted.get(),
            "seconds": secs,
            "passed": result.is_ok(),
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("QOS_FUZZ_REPORT file");
        writeln!(f, "{line}").expect("writing the fuzz report");
    }
    if let Err(e) = result {
        panic!("{target}: {e}");
    }
}

#[test]
fn fuzz_config() {
    fuzz("config", mutated(CONFIG_SEEDS), |input| {
        let text = String::from_utf8_lossy(&input);
        match Config::parse(&text) {
            Ok(c) => {
                if let Err(e) = c.validate() {
                    prop_assert!(!e.trim().is_empty());
                }
                Ok(true)
            }
            Err(e) => {
                prop_assert!(!e.to_string().trim().is_empty());
                Ok(false)
            }
        }
    });
}

#[test]
fn fuzz_request() {
    let h = fixture();
    let root = h.unified_root().unwrap().to_owned();
    fuzz("socket API request", mutated(REQUEST_SEEDS), |input| {
        let Ok(req) = serde_json::from_slice::<Request>(&input) else {
            return Ok(false);
        };
        // What dispatch does before touching the kernel.
        let cgroup = match &req {
            Request::NetSet {
                cgroup,
                rate,
                ceil,
                priority,
                ingress_rate,
                ingress_ceil,
            } => {
                let q = netqos::NetQuota {
                    rate: *rate,
                    ceil: *ceil,
                    priority: *priority,
                    ingress_rate: *ingress_rate,
                    ingress_ceil: *ingress_ceil,
                };
                if let Err(e) = q.validate_form() {
                    prop_assert!(!e.to_string().is_empty());
                }
                Some(cgroup)
            }
            Request::MemSet {
                cgroup,
                guarantee,
                limit,
                priority,
            } => {
                let q = emc::MemQuota {
                    guarantee: *guarantee,
                    limit: *limit,
                    priority: *priority,
                };
                let _ = q.validate();
                Some(cgroup)
            }
            Request::IoSet {
                cgroup,
                device,
                limits,
            } => {
                let _ = limits.validate();
                if !device.starts_with('/') {
                    let _ = blkio::Device::parse(device);
                }
                Some(cgroup)
            }
            Request::NetUnset { cgroup }
            | Request::MemUnset { cgroup }
            | Request::IoUnset { cgroup, .. } => Some(cgroup),
            _ => None,
        };
        if let Some(name) = cgroup
            && let Ok(canonical) = h.canonical_name(name)
        {
            // Never outside the tree, whatever the dots and slashes.
            let full = root.join(&canonical);
            prop_assert!(full.starts_with(&root), "{name:?} -> {canonical:?}");
            prop_assert!(
                !Path::new(&canonical)
                    .components()
                    .any(|c| c.as_os_str() == "..")
            );
        }
        Ok(true)
    });
}

#[test]
fn fuzz_units() {
    fuzz("unit parsers", mutated(UNIT_SEEDS), |input| {
        let s = String::from_utf8_lossy(&input);
        let mut any = false;
        if let Ok(r) = s.parse::<Rate>() {
            prop_assert_eq!(r.to_string().parse::<Rate>().ok(), Some(r));
            any = true;
        }
        if let Ok(z) = s.parse::<Size>() {
            prop_assert_eq!(z.to_string().parse::<Size>().ok(), Some(z));
            any = true;
        }
        if let Ok(b) = s.parse::<blkio::ByteRate>() {
            prop_assert_eq!(b.to_string().parse::<blkio::ByteRate>().ok(), Some(b));
            any = true;
        }
        if !s.starts_with('/')
            && let Ok(d) = blkio::Device::parse(&s)
        {
            prop_assert_eq!(blkio::Device::parse(&d.to_string()).ok(), Some(d));
            any = true;
        }
        Ok(any)
    });
}

#[test]
fn fuzz_mountinfo() {
    fuzz("mountinfo parser", mutated(MOUNTINFO_SEEDS), |input| {
        let text = String::from_utf8_lossy(&input);
        match Hierarchy::from_mountinfo(&text) {
            Some(h) => {
                let _ = h.mode();
                let _ = h.canonical_name("a/../b");
                Ok(true)
            }
            None => Ok(false),
        }
    });
}
