//! `qosd.toml`: every key optional, defaults documented here and in
//! `packaging/qosd.toml`. Unknown keys are errors (a typo must not silently
//! fall back to a default).

use std::path::{Path, PathBuf};

use emc::{MemQuota, Tuning};
use netqos::{ContainerInterfaces, NetQuota};
use qos_core::{Rate, Size};
use serde::{Deserialize, Serialize};

use crate::QosError;

pub const DEFAULT_CONFIG: &str = "/etc/qosd/qosd.toml";
pub const DEFAULT_SOCKET: &str = "/run/qosd/qosd.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/qosd";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub net: NetConfig,
    pub mem: MemConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Unix socket of the API (root only).
    pub socket: PathBuf,
    /// Where the desired state is persisted.
    pub state_dir: PathBuf,
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
    /// Clamp the receive window of ECN-capable flows too, not only of flows
    /// without ECN (for senders on microsecond round trips, where CE marks
    /// cannot slow a flow below two segments per round trip).
    pub ingress_clamp_ecn: bool,
    /// Interfaces where container traffic enters the host: "auto" (every
    /// veth), "none", or a list of name patterns (`*` wildcard).
    pub container_interfaces: ContainerInterfaces,
    /// Turn on the kernel's per-program run-time statistics while qosd runs.
    pub bpf_stats: bool,
    /// Switch shaped flows that use BBR to CUBIC: BBR paces itself at the
    /// rate it has delivered and never follows a pacing cap that rises.
    pub replace_bbr: bool,
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
            ingress_clamp_ecn: false,
            container_interfaces: ContainerInterfaces::default(),
            bpf_stats: false,
            replace_bbr: true,
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
    /// v1 hosts with a scope: hold back the kernel OOM killer in the scope
    /// so that its tasks wait while qosd picks the victim.
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
        if n.default_priority > 7 {
            return Err(format!(
                "[net] default_priority {} is out of range 0..=7",
                n.default_priority
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
    fn missing_default_file_means_defaults_but_explicit_is_an_error() {
        let p = Path::new("/nonexistent/qosd.toml");
        assert_eq!(Config::load(p, false).ok(), Some(Config::default()));
        let e = Config::load(p, true).expect_err("explicit").to_string();
        assert!(e.contains("/nonexistent/qosd.toml"), "{e}");
    }

    #[test]
    fn the_shipped_sample_parses() {
        let text = include_str!("../../../packaging/qosd.toml");
        Config::parse(text).unwrap_or_else(|e| panic!("packaging/qosd.toml: {e}"));
    }
}
