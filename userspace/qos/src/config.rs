//! `qosd.toml`: every key optional, defaults documented here and in
//! `packaging/qosd.toml`. Unknown keys are errors (a typo must not silently
//! fall back to a default).

use std::path::{Path, PathBuf};

use blkio::{ByteRate, Device, IoLimits};
use emc::{MemQuota, Tuning};
use netqos::{ContainerInterfaces, NetQuota};
use qos_core::{Rate, Size};
use serde::{Deserialize, Serialize};

use crate::QosError;

pub const DEFAULT_CONFIG: &str = "/etc/qosd/qosd.toml";
pub const DEFAULT_SOCKET: &str = "/run/qosd/qosd.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/qosd";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/qos";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub net: NetConfig,
    pub mem: MemConfig,
    pub io: IoConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Unix socket of the API (root only).
    pub socket: PathBuf,
    /// Where the desired state is persisted.
    pub state_dir: PathBuf,
    /// bpffs directory where the eBPF datapaths are pinned, so that they
    /// keep working while qosd restarts and the next qosd adopts them.
    pub bpf_pin_dir: PathBuf,
    /// Address of the Prometheus/OpenMetrics endpoint (`GET /metrics`);
    /// off when unset. Loopback only unless `metrics_allow_remote`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Allow a metrics address other than loopback.
    pub metrics_allow_remote: bool,
    /// A configured cgroup that vanishes leaves the datapath and the
    /// controllers within a second. true: its quotas stay in the desired
    /// state and are applied again when a cgroup with the same path
    /// appears; false: they are dropped, as if unset.
    pub follow_recreated_cgroups: bool,
    /// Where qosd mounts a cgroup2 tree on hosts that have none (pure v1).
    pub cgroup2_fallback: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` overrides it.
    pub log: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            bpf_pin_dir: DEFAULT_PIN_DIR.into(),
            metrics_listen: None,
            metrics_allow_remote: false,
            follow_recreated_cgroups: true,
            cgroup2_fallback: "/run/qosd/cgroup2".into(),
            log: "info".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// Interface to shape. Egress shaping is off when unset.
    pub interface: Option<String>,
    /// Egress capacity of the interface; required with `interface`.
    pub egress_capacity: Option<Rate>,
    /// Guarantee of the class that carries traffic of cgroups without a quota;
    /// "0" makes it best effort (only capacity others leave unused).
    #[serde(with = "qos_core::units::rate_or_zero")]
    pub default_rate: Option<Rate>,
    /// Priority of that class (0 highest ..= 7), both directions.
    pub default_priority: u32,
    /// Capacity of the interface for received traffic; ingress shaping is
    /// off when unset.
    pub ingress_capacity: Option<Rate>,
    /// Ingress guarantee of the default class; "0" makes it best effort.
    #[serde(with = "qos_core::units::rate_or_zero")]
    pub ingress_default_rate: Option<Rate>,
    /// Hold ECN-capable received flows by their receive windows too, not
    /// only flows without ECN (default). Matters only without ACK pacing
    /// (with it every flow's window is clamped): false leaves ECN flows to
    /// CE marks, which cannot slow a flow below two segments per round
    /// trip, nothing on a round trip of microseconds.
    pub ingress_clamp_ecn: bool,
    /// Pace received TCP flows by holding their ACKs until the flow's rate
    /// allows them: qosd puts fq at the shaped interface's root when the
    /// root is the kernel's default (fq honours the ACKs' departure times).
    /// Off, or without the fq qdisc, TCP flows are held by their receive
    /// windows, which share the link's queue upstream in proportion, and
    /// other traffic by CE marks and drops.
    pub ingress_ack_pacing: bool,
    /// Buffer of the link's far end that received traffic queues in (the
    /// switch port's, per port). Without ACK pacing, received flows'
    /// windows add up to half of it beyond their round trips: set it at or
    /// below the real buffer, or the windows overflow it and the senders
    /// lose packets there (a 64 KiB buffer under the 256 KiB default: a
    /// class at 0.00 of its quota in its worst 100 ms windows).
    pub ingress_upstream_buffer: Size,
    /// Interfaces where container traffic enters the host: "auto" (every
    /// veth), "none", or a list of name patterns (`*` wildcard).
    pub container_interfaces: ContainerInterfaces,
    /// Turn on the kernel's per-program run-time statistics while qosd runs.
    pub bpf_stats: bool,
    /// Switch shaped flows that use BBR to CUBIC: BBR paces itself at the
    /// rate it has delivered and never follows a pacing cap that rises.
    pub replace_bbr: bool,
    /// Most quotas per direction (1..=4095). Every quota costs map reads in
    /// each 10 ms control step.
    pub max_quotas: u32,
    /// Quotas applied at start, before the persisted state.
    pub quota: Vec<QuotaEntry>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            interface: None,
            egress_capacity: None,
            default_rate: Rate::from_bits_per_sec(10_000_000).ok(),
            default_priority: 7,
            ingress_capacity: None,
            ingress_default_rate: Rate::from_bits_per_sec(10_000_000).ok(),
            ingress_clamp_ecn: true,
            ingress_ack_pacing: true,
            ingress_upstream_buffer: Size::clamped(netqos::DEFAULT_UPSTREAM_BUFFER),
            container_interfaces: ContainerInterfaces::default(),
            bpf_stats: false,
            replace_bbr: true,
            max_quotas: netqos::MAX_QUOTAS,
            quota: Vec::new(),
        }
    }
}

/// `[[net.quota]]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaEntry {
    pub cgroup: String,
    /// Egress guarantee.
    #[serde(default)]
    pub rate: Option<Rate>,
    #[serde(default)]
    pub ceil: Option<Rate>,
    #[serde(default)]
    pub priority: u32,
    /// Ingress guarantee.
    #[serde(default)]
    pub ingress_rate: Option<Rate>,
    #[serde(default)]
    pub ingress_ceil: Option<Rate>,
}

impl QuotaEntry {
    pub fn quota(&self) -> NetQuota {
        NetQuota {
            rate: self.rate,
            ceil: self.ceil,
            priority: self.priority,
            ingress_rate: self.ingress_rate,
            ingress_ceil: self.ingress_ceil,
        }
    }
}

/// `[mem]`: elastic memory control.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemConfig {
    /// Turn elastic memory control on.
    pub enabled: bool,
    /// A cgroup whose memory limit stands for the host (e.g. the parent of
    /// all containers); unset: the whole host.
    pub scope: Option<String>,
    /// Memory that guarantees may not claim (system, daemons).
    pub reserve: Size,
    /// Milliseconds between control steps (pressure notifications wake the
    /// loop earlier).
    pub interval_ms: u64,
    /// With a scope: hold back the kernel OOM killer in the scope so that its
    /// tasks wait while qosd picks the victim (v1: oom_control; v2:
    /// memory.high a little under the scope's memory.max).
    pub hold_scope_oom: bool,
    /// Thresholds and steps (see `emc::Tuning`).
    pub tuning: Tuning,
    /// Quotas applied at start, before the persisted state.
    pub quota: Vec<MemQuotaEntry>,
}

impl Default for MemConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            scope: None,
            reserve: Size::clamped(512 << 20),
            interval_ms: 200,
            hold_scope_oom: true,
            tuning: Tuning::default(),
            quota: Vec::new(),
        }
    }
}

/// `[[mem.quota]]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemQuotaEntry {
    pub cgroup: String,
    pub guarantee: Size,
    #[serde(default)]
    pub limit: Option<Size>,
    #[serde(default)]
    pub priority: u32,
}

impl MemQuotaEntry {
    pub fn quota(&self) -> MemQuota {
        MemQuota {
            guarantee: self.guarantee,
            limit: self.limit,
            priority: self.priority,
        }
    }
}

/// `[io]`: disk IO control per cgroup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoConfig {
    /// Turn disk IO control on.
    pub enabled: bool,
    /// Milliseconds between control steps.
    pub interval_ms: u64,
    /// Starting point of each device's capacity estimate (weights are
    /// turned into write rates over it where the kernel cannot weigh).
    pub initial_capacity: ByteRate,
    /// Limits applied at start, before the persisted state.
    pub limit: Vec<IoLimitEntry>,
}

/// Default of `[io] initial_capacity`, bytes per second.
pub const DEFAULT_IO_INITIAL_CAPACITY: u64 = 64 << 20;

fn default_initial_capacity() -> ByteRate {
    ByteRate::clamped(DEFAULT_IO_INITIAL_CAPACITY)
}

impl Default for IoConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval_ms: 50,
            initial_capacity: default_initial_capacity(),
            limit: Vec::new(),
        }
    }
}

/// `[[io.limit]]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoLimitEntry {
    pub cgroup: String,
    /// `/dev/loop3` or `7:3`.
    pub device: Device,
    #[serde(flatten)]
    pub limits: IoLimits,
}

impl Config {
    /// Reads a config file. A missing file at the default path means "all
    /// defaults"; a missing file named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, QosError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(QosError::Io {
                    path: path.into(),
                    source,
                });
            }
        };
        Self::parse(&text).map_err(|reason| QosError::Config {
            path: path.into(),
            reason,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(addr) = self.daemon.metrics_listen {
            crate::metrics::check_listen(addr, self.daemon.metrics_allow_remote)
                .map_err(|e| format!("[daemon] {e}"))?;
        }
        if !self.daemon.bpf_pin_dir.is_absolute() {
            return Err(format!(
                "[daemon] bpf_pin_dir {} must be an absolute path (on bpffs)",
                self.daemon.bpf_pin_dir.display()
            ));
        }
        let n = &self.net;
        match (&n.interface, &n.egress_capacity) {
            (Some(_), None) => {
                return Err(
                    "[net] interface is set but egress_capacity is not; give the interface's \
                            capacity (e.g. egress_capacity = \"1gbit\")"
                        .into(),
                );
            }
            (None, Some(_)) => {
                return Err("[net] egress_capacity is set but interface is not".into());
            }
            _ => {}
        }
        if let Some(cap) = n.egress_capacity
            && let Some(r) = n.default_rate.filter(|r| *r > cap)
        {
            return Err(format!(
                "[net] default_rate {r} exceeds egress_capacity {cap}"
            ));
        }
        if !(1..=netqos::MAX_QUOTAS).contains(&n.max_quotas) {
            return Err(format!(
                "[net] max_quotas {} is out of range 1..={}",
                n.max_quotas,
                netqos::MAX_QUOTAS
            ));
        }
        if n.default_priority > 7 {
            return Err(format!(
                "[net] default_priority {} is out of range 0..=7",
                n.default_priority
            ));
        }
        if !netqos::UPSTREAM_BUFFER_RANGE.contains(&n.ingress_upstream_buffer.bytes()) {
            return Err(format!(
                "[net] ingress_upstream_buffer {} is out of range 16KiB..=256MiB",
                n.ingress_upstream_buffer
            ));
        }
        if n.ingress_capacity.is_some() && n.interface.is_none() {
            return Err("[net] ingress_capacity is set but interface is not".into());
        }
        if let Some(cap) = n.ingress_capacity
            && let Some(r) = n.ingress_default_rate.filter(|r| *r > cap)
        {
            return Err(format!(
                "[net] ingress_default_rate {r} exceeds ingress_capacity {cap}"
            ));
        }
        for q in &n.quota {
            q.quota()
                .validate_form()
                .map_err(|e| format!("[[net.quota]] cgroup \"{}\": {e}", q.cgroup))?;
            if q.ingress_rate.is_some() && n.ingress_capacity.is_none() {
                return Err(format!(
                    "[[net.quota]] cgroup \"{}\" has an ingress_rate but [net] ingress_capacity is not set",
                    q.cgroup
                ));
            }
        }
        n.container_interfaces.validate()?;
        if !n.quota.is_empty() && n.interface.is_none() {
            return Err("[[net.quota]] entries need [net] interface and egress_capacity".into());
        }
        let m = &self.mem;
        if !(20..=10_000).contains(&m.interval_ms) {
            return Err(format!(
                "[mem] interval_ms = {} is out of range 20..=10000",
                m.interval_ms
            ));
        }
        m.tuning
            .validate()
            .map_err(|e| format!("[mem.tuning] {e}"))?;
        for q in &m.quota {
            q.quota()
                .validate()
                .map_err(|e| format!("[[mem.quota]] cgroup \"{}\": {e}", q.cgroup))?;
        }
        if !m.quota.is_empty() && !m.enabled {
            return Err("[[mem.quota]] entries need [mem] enabled = true".into());
        }
        let io = &self.io;
        if !(10..=5000).contains(&io.interval_ms) {
            return Err(format!(
                "[io] interval_ms = {} is out of range 10..=5000",
                io.interval_ms
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for l in &io.limit {
            l.limits.validate().map_err(|e| {
                format!(
                    "[[io.limit]] cgroup \"{}\" device {}: {e}",
                    l.cgroup, l.device
                )
            })?;
            if !seen.insert((l.cgroup.trim(), l.device)) {
                return Err(format!(
                    "[[io.limit]] cgroup \"{}\" device {} is given twice",
                    l.cgroup, l.device
                ));
            }
        }
        if !io.limit.is_empty() && !io.enabled {
            return Err("[[io.limit]] entries need [io] enabled = true".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_all_defaults() {
        let c = Config::parse("").expect("empty");
        assert_eq!(c, Config::default());
        assert_eq!(c.daemon.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(
            c.net.default_rate.map(|r| r.to_string()),
            Some("10mbit".into())
        );
        let best_effort = Config::parse("[net]\ndefault_rate = \"0\"").expect("zero default");
        assert_eq!(best_effort.net.default_rate, None);
        assert!(c.net.interface.is_none());
        assert_eq!(c.net.ingress_upstream_buffer.bytes(), 256 * 1024);
        let shallow = Config::parse("[net]\ningress_upstream_buffer = \"64KiB\"").expect("64KiB");
        assert_eq!(shallow.net.ingress_upstream_buffer.bytes(), 64 * 1024);
    }

    #[test]
    fn full_config() {
        let c = Config::parse(
            r#"
            [daemon]
            socket = "/tmp/x.sock"
            [net]
            interface = "eth0"
            egress_capacity = "10gbit"
            default_rate = "5mbit"
            container_interfaces = ["veth*", "cali*"]
            [[net.quota]]
            cgroup = "tenants/a"
            rate = "1gbit"
            ceil = "2gbit"
            priority = 1
            "#,
        )
        .expect("full");
        assert_eq!(c.net.quota.len(), 1);
        assert_eq!(
            c.net.quota[0].ceil.map(|r| r.to_string()),
            Some("2gbit".into())
        );
        assert_eq!(
            c.net.container_interfaces,
            ContainerInterfaces::Patterns(vec!["veth*".into(), "cali*".into()])
        );
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        for (text, needle) in [
            ("[net]\ninterfce = \"eth0\"", "unknown field `interfce`"),
            ("[net]\ninterface = \"eth0\"", "egress_capacity is not"),
            ("[net]\negress_capacity = \"1gbit\"", "interface is not"),
            (
                "[net]\ninterface = \"eth0\"\negress_capacity = \"fast\"",
                "not a rate",
            ),
            (
                "[net]\ninterface = \"eth0\"\negress_capacity = \"0\"",
                "zero",
            ),
            (
                "[net]\ninterface = \"e\"\negress_capacity = \"1mbit\"\ndefault_rate = \"2mbit\"",
                "exceeds",
            ),
            ("[net]\ndefault_priority = 9", "out of range"),
            (
                "[net]\ningress_upstream_buffer = \"8KiB\"",
                "ingress_upstream_buffer 8KiB is out of range",
            ),
            (
                "[net]\ningress_upstream_buffer = \"1GiB\"",
                "ingress_upstream_buffer 1GiB is out of range",
            ),
            ("[net]\ncontainer_interfaces = \"maybe\"", "use \"auto\""),
            (
                "[[net.quota]]\ncgroup = \"a\"\nrate = \"1mbit\"",
                "need [net] interface",
            ),
            ("[daemon]\nsocket = 5", "invalid type"),
            (
                "[net]\ningress_capacity = \"1gbit\"",
                "ingress_capacity is set but interface is not",
            ),
            (
                "[net]\ninterface = \"e\"\negress_capacity = \"1gbit\"\ningress_capacity = \"1mbit\"",
                "ingress_default_rate 10mbit exceeds ingress_capacity 1mbit",
            ),
            (
                "[net]\ninterface = \"e\"\negress_capacity = \"1gbit\"\n[[net.quota]]\ncgroup = \"a\"\ningress_rate = \"1mbit\"",
                "has an ingress_rate but [net] ingress_capacity is not set",
            ),
            (
                "[net]\ninterface = \"e\"\negress_capacity = \"1gbit\"\n[[net.quota]]\ncgroup = \"a\"",
                "give an egress rate, an ingress rate, or both",
            ),
            (
                "[net]\ninterface = \"e\"\negress_capacity = \"1gbit\"\n[[net.quota]]\ncgroup = \"a\"\nrate = \"1mbit\"\ningress_ceil = \"2mbit\"",
                "an ingress ceil needs an ingress rate",
            ),
            ("[mem]\ninterval_ms = 5", "interval_ms = 5 is out of range"),
            ("[mem]\nreserve = \"lots\"", "not a size"),
            (
                "[mem.tuning]\ntight_free_pct = 1.0",
                "[mem.tuning] thresholds must satisfy",
            ),
            (
                "[mem]\nenabled = true\n[[mem.quota]]\ncgroup = \"a\"\nguarantee = \"1G\"\nlimit = \"512M\"",
                "[[mem.quota]] cgroup \"a\": limit 512MiB is below the guarantee 1GiB",
            ),
            (
                "[[mem.quota]]\ncgroup = \"a\"\nguarantee = \"1G\"",
                "need [mem] enabled = true",
            ),
            ("[[mem.quota]]\ncgroup = \"a\"", "missing field `guarantee`"),
            ("[mem]\nenabled = \"yes\"", "invalid type"),
        ] {
            let e = Config::parse(text).expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn io_section() {
        let c = Config::parse("").expect("empty");
        assert!(!c.io.enabled);
        assert_eq!(c.io.interval_ms, 50);
        assert_eq!(c.io.initial_capacity.bytes_per_sec(), 64 << 20);
        assert!(c.io.limit.is_empty());
        let c = Config::parse(
            r#"
            [io]
            enabled = true
            interval_ms = 100
            initial_capacity = "200MiB/s"
            [[io.limit]]
            cgroup = "tenants/a"
            device = "7:3"
            write_bps = "10MiB"
            read_bps = 1048576
            write_iops = 500
            read_iops = 800
            weight = 100
            [[io.limit]]
            cgroup = "tenants/a"
            device = "259:0"
            weight = 1000
            [[io.limit]]
            cgroup = "tenants/b"
            device = "7:3"
            weight = 1
            "#,
        )
        .expect("io");
        assert!(c.io.enabled);
        assert_eq!(c.io.interval_ms, 100);
        assert_eq!(c.io.initial_capacity.bytes_per_sec(), 200 << 20);
        assert_eq!(c.io.limit.len(), 3);
        let a = &c.io.limit[0];
        assert_eq!(
            (a.cgroup.as_str(), a.device.to_string()),
            ("tenants/a", "7:3".into())
        );
        assert_eq!(
            a.limits,
            IoLimits {
                write_bps: Some("10M".parse().expect("rate")),
                read_bps: Some("1MiB".parse().expect("rate")),
                write_iops: Some(500),
                read_iops: Some(800),
                weight: Some(100),
            }
        );
        assert_eq!(c.io.limit[1].limits.weight, Some(1000));
        // A device by path: any block device node this host has.
        let node = std::fs::read_dir("/sys/class/block")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| Path::new("/dev").join(e.file_name()))
            .find(|p| p.exists());
        if let Some(node) = node {
            let c = Config::parse(&format!(
                "[io]\nenabled = true\n[[io.limit]]\ncgroup = \"a\"\ndevice = \"{}\"\nweight = 10",
                node.display()
            ))
            .expect("device by path");
            let want = Device::parse(&node.display().to_string()).expect("device");
            assert_eq!(c.io.limit[0].device, want);
        }
    }

    #[test]
    fn bad_io_configs_say_what_is_wrong() {
        let limit =
            |body: &str| format!("[io]\nenabled = true\n[[io.limit]]\ncgroup = \"a\"\n{body}");
        for (text, needle) in [
            ("[io]\nenabel = true".to_string(), "unknown field `enabel`"),
            ("[io]\nenabled = 1".into(), "invalid type"),
            (
                "[io]\ninterval_ms = 5".into(),
                "[io] interval_ms = 5 is out of range 10..=5000",
            ),
            (
                "[io]\ninterval_ms = 5001".into(),
                "[io] interval_ms = 5001 is out of range 10..=5000",
            ),
            (
                "[io]\ninitial_capacity = \"fast\"".into(),
                "invalid byte rate 'fast'",
            ),
            ("[io]\ninitial_capacity = \"0\"".into(), "zero"),
            (
                "[[io.limit]]\ncgroup = \"a\"\ndevice = \"7:3\"\nweight = 10".into(),
                "[[io.limit]] entries need [io] enabled = true",
            ),
            (
                limit("device = \"7:3\"\nweight = 0"),
                "[[io.limit]] cgroup \"a\" device 7:3: weight 0 is outside 1..=1000",
            ),
            (
                limit("device = \"7:3\"\nweight = 1001"),
                "[[io.limit]] cgroup \"a\" device 7:3: weight 1001 is outside 1..=1000",
            ),
            (
                limit("device = \"7:3\""),
                "[[io.limit]] cgroup \"a\" device 7:3: no limit given",
            ),
            (
                limit("device = \"7:3\"\nwrite_iops = 0"),
                "write_iops must be between 1 and",
            ),
            (limit("device = \"7:3\"\nwrite_bps = \"0\""), "zero"),
            (
                limit("device = \"7:3\"\nread_bps = \"lots\""),
                "invalid byte rate 'lots'",
            ),
            (
                limit("device = \"7:x\"\nweight = 10"),
                "device '7:x': minor 'x' is not a number",
            ),
            (
                limit("device = \"/dev/nope\"\nweight = 10"),
                "device '/dev/nope'",
            ),
            (limit("device = \"loop3\"\nweight = 10"), "use a path"),
            (limit("weight = 10"), "missing field `device`"),
            (
                limit("device = \"7:3\"\nwrite_bsp = \"1M\""),
                "unknown field `write_bsp`",
            ),
            (
                limit(
                    "device = \"7:3\"\nweight = 10\n[[io.limit]]\ncgroup = \"a\"\ndevice = \"7:3\"\nweight = 20",
                ),
                "[[io.limit]] cgroup \"a\" device 7:3 is given twice",
            ),
            (
                "[io]\nenabled = true\n[[io.limit]]\ndevice = \"7:3\"\nweight = 1".into(),
                "missing field `cgroup`",
            ),
        ] {
            let e = Config::parse(&text).expect_err(&text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn missing_default_file_means_defaults_but_explicit_is_an_error() {
        let p = Path::new("/nonexistent/qosd.toml");
        assert_eq!(Config::load(p, false).ok(), Some(Config::default()));
        let e = Config::load(p, true).expect_err("explicit").to_string();
        assert!(e.contains("/nonexistent/qosd.toml"), "{e}");
    }

    #[test]
    fn the_shipped_sample_parses_and_documents_every_key() {
        let text = include_str!("../../../packaging/qosd.toml");
        Config::parse(text).unwrap_or_else(|e| panic!("packaging/qosd.toml: {e}"));
        // Every key of every table, set or commented out ("# key = ").
        fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    match v {
                        toml::Value::Table(_) => keys(k, v, out),
                        _ => out.push((prefix.to_owned(), k.clone())),
                    }
                }
            }
        }
        let mut all = Config::default();
        // Optional keys serialise only when set.
        all.daemon.metrics_listen = Some("127.0.0.1:1".parse().unwrap());
        all.net.interface = Some("x".into());
        all.net.egress_capacity = Some("1gbit".parse().unwrap());
        all.net.ingress_capacity = Some("1gbit".parse().unwrap());
        all.mem.scope = Some("s".into());
        let mut found = Vec::new();
        keys("", &toml::Value::try_from(&all).unwrap(), &mut found);
        assert!(found.len() > 30, "{found:?}");
        for (table, key) in found {
            let documented = text.contains(&format!("[[{table}.{key}]]"))
                || text.lines().any(|l| {
                    let l = l.trim_start_matches('#').trim_start();
                    l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}="))
                });
            assert!(documented, "[{table}] {key} is not in packaging/qosd.toml");
        }
    }
}
