//! The toolkit's library: the typed API a scheduler embeds and the daemon
//! `qosd` wraps.
//!
//! ```no_run
//! use qos::{Config, Qos};
//! use netqos::NetQuota;
//! let mut config = Config::default();
//! config.net.interface = Some("eth0".into());
//! config.net.egress_capacity = Some("10gbit".parse()?);
//! config.net.ingress_capacity = Some("10gbit".parse()?);
//! let mut qos = Qos::start(config)?;
//! let quota = NetQuota {
//!     rate: Some("1gbit".parse()?),
//!     ingress_rate: Some("2gbit".parse()?),
//!     ..Default::default()
//! };
//! qos.set_net_quota("tenants/a", quota)?;
//! loop {
//!     qos.tick()?; // every netqos::TICK
//!     # break;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Qos`] holds the desired state (the single source of truth), persists it
//! when it was given a state directory, and applies it to the kernel.
//!
//! Elastic memory control runs on its own clock: call [`Qos::mem_step`]
//! every [`Qos::mem_interval`], or sooner when the waker of
//! [`Qos::mem_waker`] fires (qosd runs this on a thread of its own, through
//! [`Qos::mem_controller`], so that a slow reclaim never delays the network
//! loop).
//!
//! Disk IO control likewise: call [`Qos::io_step`] every
//! [`Qos::io_interval`] (qosd steps [`Qos::io_controller`] on a thread of
//! its own).

pub mod client;
pub mod config;
pub mod metrics;
pub mod probe;
pub mod protocol;
pub mod server;
pub mod state;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use blkio::{BlkioError, Device, IoControl, IoLimits, controller::IoSettings};
pub use config::Config;
use emc::{Emc, EmcError, EmcSettings, MemQuota, MemStatus, Waker};
use netqos::{NetError, NetQuota, NetStatus, Shaper, ShaperSettings, policy::Tuning};
use qos_core::{CgroupError, CgroupMode, Hierarchy};
use serde::{Deserialize, Serialize};
use state::{DesiredState, StateStore};
use tracing::{info, warn};

/// How often configured cgroups are checked for existence.
/// How often configured cgroups are checked for having vanished or
/// appeared: a vanished cgroup leaves the datapath within a second.
const CGROUP_CHECK: Duration = Duration::from_millis(400);

#[derive(Debug, thiserror::Error)]
pub enum QosError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(
        "network shaping is not configured on this host: set [net] interface and egress_capacity in the qosd config"
    )]
    NetNotConfigured,
    #[error(transparent)]
    Mem(#[from] EmcError),
    #[error(
        "elastic memory control is not enabled on this host: set [mem] enabled = true in the qosd config"
    )]
    MemNotConfigured,
    /// Disk IO control (named `Blkio`: `Io` is taken by file errors).
    #[error(transparent)]
    Blkio(#[from] BlkioError),
    #[error(
        "disk IO control is not enabled on this host: set [io] enabled = true in the qosd config"
    )]
    IoNotConfigured,
}

/// What `qosctl status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub cgroup_mode: String,
    pub cgroup2_root: String,
    pub net: Option<NetSummary>,
    /// Elastic memory control; absent when not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<MemSummary>,
    /// Disk IO control; absent when not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<IoSummary>,
    /// Quotas waiting for their cgroup to (re)appear.
    pub waiting: Vec<String>,
    pub state_file: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetSummary {
    pub interface: String,
    pub capacity: String,
    pub classes: usize,
    pub guaranteed: String,
    /// Ingress capacity and guarantees; absent when ingress is not shaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_capacity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_guaranteed: Option<String>,
    pub tagged_interfaces: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemSummary {
    /// Memory controller in use: v1 or v2.
    pub backend: String,
    /// "host" or the cgroup standing for it.
    pub scope: String,
    pub capacity: u64,
    pub level: String,
    pub quotas: usize,
    pub guaranteed: u64,
    /// What wakes the control loop early (PSI trigger, v1 events, timer).
    pub woken_by: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IoSummary {
    /// How limits reach buffered writes (`v1-assisted ...`, `v2-kernel ...`).
    pub mode: String,
    /// (cgroup, device) pairs with limits in force.
    pub limits: usize,
}

/// The memory controller, shared with the thread that steps it.
pub type MemController = Arc<Mutex<Emc>>;

/// The disk IO controller, shared with the thread that steps it.
pub type IoController = Arc<Mutex<IoControl>>;

/// The toolkit, embedded.
#[derive(Debug)]
pub struct Qos {
    config: Config,
    hierarchy: Hierarchy,
    state: DesiredState,
    store: Option<StateStore>,
    net: Option<Shaper>,
    mem: Option<MemController>,
    mem_woken_by: String,
    io: Option<IoController>,
    started: Instant,
    last_cgroup_check: Instant,
    requests: u64,
    request_errors: u64,
    degradations: BTreeMap<String, u64>,
    /// Memory quotas seen in force at the last check, and IO limits whose
    /// cgroup vanished since (what `forget_vanished` drops).
    mem_seen: std::collections::BTreeSet<String>,
    io_vanished: Vec<(String, String)>,
    step_last: Duration,
    step_max: Duration,
}

impl Qos {
    /// Detects the host, starts the configured subsystems and applies the
    /// config's quotas, then the persisted state (state wins). Quotas whose
    /// cgroup does not exist yet wait for it.
    ///
    /// The eBPF datapaths are pinned under `[daemon] bpf_pin_dir`: what an
    /// earlier daemon left there is adopted (it kept enforcing while no
    /// daemon ran), and [`Qos::shutdown`] leaves them for the next one.
    pub fn start(config: Config) -> Result<Self, QosError> {
        Self::start_with_store(
            config.clone(),
            Some(StateStore::new(&config.daemon.state_dir)),
        )
    }

    /// As [`Qos::start`], without persistence and without pins: everything
    /// goes with this value (embedding schedulers that keep their own
    /// state, tests).
    pub fn start_ephemeral(config: Config) -> Result<Self, QosError> {
        Self::start_with_store(config, None)
    }

    fn start_with_store(config: Config, store: Option<StateStore>) -> Result<Self, QosError> {
        let pin_root = store.as_ref().map(|_| config.daemon.bpf_pin_dir.clone());
        if store.is_some() {
            std::fs::create_dir_all(&config.daemon.state_dir).map_err(|source| QosError::Io {
                path: config.daemon.state_dir.clone(),
                source,
            })?;
        }
        config.validate().map_err(|reason| QosError::Config {
            path: "(in memory)".into(),
            reason,
        })?;
        let mut hierarchy = Hierarchy::detect()?;
        if hierarchy.mode() == CgroupMode::V1 {
            hierarchy.ensure_cgroup2(&config.daemon.cgroup2_fallback)?;
        }
        info!(mode = %hierarchy.mode(), root = %hierarchy.unified_root()?.display(), "cgroup hierarchy");
        let net = match (&config.net.interface, config.net.egress_capacity) {
            (Some(iface), Some(capacity)) => {
                let settings = ShaperSettings {
                    interface: iface.clone(),
                    capacity,
                    default_rate: config.net.default_rate,
                    ingress_capacity: config.net.ingress_capacity,
                    ingress_default_rate: config
                        .net
                        .ingress_capacity
                        .and(config.net.ingress_default_rate),
                    ingress_clamp_ecn: config.net.ingress_clamp_ecn,
                    ingress_ack_pacing: config.net.ingress_ack_pacing,
                    ingress_upstream_buffer: config.net.ingress_upstream_buffer.bytes(),
                    default_priority: config.net.default_priority,
                    container_interfaces: config.net.container_interfaces.clone(),
                    replace_bbr: config.net.replace_bbr,
                    tuning: Tuning::default(),
                    pin_root: pin_root.clone(),
                    max_quotas: config.net.max_quotas,
                };
                let mut s = Shaper::start(settings, hierarchy.unified_root()?)?;
                if config.net.bpf_stats {
                    s.datapath().enable_run_time_stats()?;
                }
                Some(s)
            }
            _ => None,
        };
        let mem = if config.mem.enabled {
            let settings = EmcSettings {
                scope: config.mem.scope.clone(),
                reserve: config.mem.reserve,
                tuning: config.mem.tuning.clone(),
                interval: Duration::from_millis(config.mem.interval_ms),
                hold_scope_oom: config.mem.hold_scope_oom,
            };
            Some(Arc::new(Mutex::new(Emc::start(&hierarchy, settings)?)))
        } else {
            None
        };
        let io = if config.io.enabled {
            let settings = IoSettings {
                interval: Duration::from_millis(config.io.interval_ms),
                initial_capacity: config.io.initial_capacity.bytes_per_sec(),
                // Writers a killed daemon left paused are thawed at start.
                paused_record: store
                    .as_ref()
                    .map(|_| config.daemon.state_dir.join("io-paused")),
                // The tracker counts on while qosd restarts.
                pin_root: pin_root.clone(),
            };
            Some(Arc::new(Mutex::new(IoControl::start(
                &hierarchy, settings,
            )?)))
        } else {
            None
        };
        let persisted = match &store {
            Some(s) => s.load()?,
            None => DesiredState {
                version: state::STATE_VERSION,
                ..Default::default()
            },
        };
        let mut qos = Self {
            state: DesiredState {
                version: state::STATE_VERSION,
                ..Default::default()
            },
            config,
            hierarchy,
            store,
            net,
            mem,
            mem_woken_by: "timer".into(),
            io,
            started: Instant::now(),
            last_cgroup_check: Instant::now(),
            requests: 0,
            request_errors: 0,
            degradations: BTreeMap::new(),
            mem_seen: Default::default(),
            io_vanished: Vec::new(),
            step_last: Duration::ZERO,
            step_max: Duration::ZERO,
        };
        let mut wanted: Vec<(String, NetQuota)> = qos
            .config
            .net
            .quota
            .iter()
            .map(|q| (q.cgroup.clone(), q.quota()))
            .collect();
        wanted.extend(persisted.net);
        for (name, quota) in wanted {
            match qos.apply_net(&name, quota) {
                Ok(applied) => {
                    qos.state.net.insert(applied, quota);
                }
                Err(QosError::Cgroup(CgroupError::NotFound { .. })) => {
                    warn!(cgroup = %name, "cgroup does not exist yet; its quota waits for it");
                    qos.state.net.insert(name, quota);
                }
                Err(e) => warn!(cgroup = %name, error = %e, "quota not re-applied"),
            }
        }
        let mut wanted_mem: Vec<(String, MemQuota)> = qos
            .config
            .mem
            .quota
            .iter()
            .map(|q| (q.cgroup.clone(), q.quota()))
            .collect();
        wanted_mem.extend(persisted.mem);
        if let Some(mem) = qos.mem.clone() {
            let mut emc = lock(&mem);
            for (name, quota) in wanted_mem {
                let adopted = qos
                    .hierarchy
                    .controller_path("memory", &name)
                    .map_err(QosError::from)
                    .and_then(|(name, _)| {
                        emc.adopt(&name, quota)?;
                        Ok(name)
                    });
                match adopted {
                    Ok(name) => {
                        qos.state.mem.insert(name, quota);
                    }
                    Err(e) => warn!(cgroup = %name, error = %e, "memory quota not re-applied"),
                }
            }
            for name in emc.waiting() {
                warn!(cgroup = %name, "cgroup does not exist yet; its memory quota waits for it");
            }
        } else if !wanted_mem.is_empty() {
            warn!("memory quotas in the state file are kept but not applied: [mem] is not enabled");
            qos.state.mem = wanted_mem.into_iter().collect();
        }
        let mut wanted_io: Vec<(String, String, IoLimits)> = qos
            .config
            .io
            .limit
            .iter()
            .map(|l| (l.cgroup.clone(), l.device.to_string(), l.limits))
            .collect();
        wanted_io.extend(
            persisted
                .io
                .into_iter()
                .flat_map(|(cg, devs)| devs.into_iter().map(move |(d, l)| (cg.clone(), d, l))),
        );
        if let Some(io) = qos.io.clone() {
            let mut ctl = lock(&io);
            for (name, device, limits) in wanted_io {
                match Self::adopt_io(&qos.hierarchy, &mut ctl, &name, &device, limits) {
                    Ok((name, dev, None)) => {
                        qos.state
                            .io
                            .entry(name)
                            .or_default()
                            .insert(dev.to_string(), limits);
                    }
                    Ok((name, dev, Some(why))) => {
                        warn!(cgroup = %name, device = %dev, "{why}; its IO limits wait for it");
                        qos.state
                            .io
                            .entry(name)
                            .or_default()
                            .insert(dev.to_string(), limits);
                    }
                    Err(e) => {
                        warn!(cgroup = %name, device = %device, error = %e, "IO limits not re-applied")
                    }
                }
            }
        } else if !wanted_io.is_empty() {
            warn!("IO limits in the state file are kept but not applied: [io] is not enabled");
            for (name, device, limits) in wanted_io {
                qos.state.io.entry(name).or_default().insert(device, limits);
            }
        }
        if let Some(net) = qos.net.as_mut()
            && let Err(e) = net.finish_start()
        {
            warn!(error = %e, "finishing the adoption of the pinned network datapath");
        }
        qos.persist()?;
        Ok(qos)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    pub fn desired(&self) -> &DesiredState {
        &self.state
    }

    fn net(&self) -> Result<&Shaper, QosError> {
        self.net.as_ref().ok_or(QosError::NetNotConfigured)
    }

    fn apply_net(&mut self, cgroup: &str, quota: NetQuota) -> Result<String, QosError> {
        let cg = self.hierarchy.resolve(cgroup)?;
        let net = self.net.as_mut().ok_or(QosError::NetNotConfigured)?;
        net.set(&cg, quota)?;
        Ok(cg.name)
    }

    /// Sets (or changes) the network quota of a cgroup, persists it, and
    /// returns the cgroup's canonical name. Refused quotas change nothing.
    pub fn set_net_quota(&mut self, cgroup: &str, quota: NetQuota) -> Result<String, QosError> {
        self.net()?;
        let cg = self.hierarchy.resolve(cgroup)?;
        self.net()?.check(&cg.name, &quota)?;
        let mut next = self.state.clone();
        next.net.insert(cg.name.clone(), quota);
        // Persist first: if the disk refuses, the kernel is not touched.
        self.save(&next)?;
        let net = self.net.as_mut().ok_or(QosError::NetNotConfigured)?;
        if let Err(e) = net.set(&cg, quota) {
            self.save(&self.state)?;
            return Err(e.into());
        }
        self.state = next;
        Ok(cg.name)
    }

    /// Removes a cgroup's network quota (also one waiting for its cgroup).
    pub fn unset_net_quota(&mut self, cgroup: &str) -> Result<String, QosError> {
        self.net()?;
        // The cgroup may be gone already: find the quota by its name.
        let name = self.hierarchy.canonical_name(cgroup)?;
        if !self.state.net.contains_key(&name) {
            return Err(NetError::NotConfigured(name).into());
        }
        let mut next = self.state.clone();
        next.net.remove(&name);
        self.save(&next)?;
        if let Some(net) = self.net.as_mut() {
            net.remove(&name)?;
        }
        self.state = next;
        Ok(name)
    }

    pub fn net_status(&self) -> Result<NetStatus, QosError> {
        Ok(self.net()?.status())
    }

    /// The memory controller, for a thread that steps it on its own clock.
    pub fn mem_controller(&self) -> Option<MemController> {
        self.mem.clone()
    }

    fn mem(&self) -> Result<MutexGuard<'_, Emc>, QosError> {
        self.mem
            .as_ref()
            .map(lock)
            .ok_or(QosError::MemNotConfigured)
    }

    /// Time between memory control steps.
    pub fn mem_interval(&self) -> Duration {
        Duration::from_millis(self.config.mem.interval_ms)
    }

    /// What wakes the memory loop before its timer; remembered for status.
    pub fn mem_waker(&mut self) -> Option<Waker> {
        let w = self.mem().ok()?.waker();
        self.mem_woken_by = w.as_ref().map_or("timer".into(), |w| w.describe());
        w
    }

    /// One memory control step (embedders without a thread of their own).
    pub fn mem_step(&self) -> Result<emc::Level, QosError> {
        Ok(self.mem()?.step()?)
    }

    /// Sets (or changes) the memory quota of a cgroup, persists it and
    /// returns the cgroup's canonical name. Refused quotas change nothing.
    pub fn set_mem_quota(&mut self, cgroup: &str, quota: MemQuota) -> Result<String, QosError> {
        if self.mem.is_none() {
            return Err(QosError::MemNotConfigured);
        }
        let (name, path) = self.hierarchy.controller_path("memory", cgroup)?;
        if !path.is_dir() {
            return Err(EmcError::NotFound { name, path }.into());
        }
        self.mem()?.check(&name, &quota)?;
        let mut next = self.state.clone();
        next.mem.insert(name.clone(), quota);
        self.save(&next)?;
        if let Err(e) = self.mem()?.set(&name, quota) {
            self.save(&self.state)?;
            return Err(e.into());
        }
        self.state = next;
        Ok(name)
    }

    /// Removes a cgroup's memory quota (also one waiting for its cgroup).
    pub fn unset_mem_quota(&mut self, cgroup: &str) -> Result<String, QosError> {
        if self.mem.is_none() {
            return Err(QosError::MemNotConfigured);
        }
        let (name, _) = self.hierarchy.controller_path("memory", cgroup)?;
        if !self.state.mem.contains_key(&name) {
            return Err(EmcError::NotConfigured(name).into());
        }
        let mut next = self.state.clone();
        next.mem.remove(&name);
        self.save(&next)?;
        self.mem()?.remove(&name)?;
        self.state = next;
        Ok(name)
    }

    pub fn mem_status(&self) -> Result<MemStatus, QosError> {
        Ok(self.mem()?.status())
    }

    /// The disk IO controller, for a thread that steps it on its own clock.
    pub fn io_controller(&self) -> Option<IoController> {
        self.io.clone()
    }

    fn io(&self) -> Result<MutexGuard<'_, IoControl>, QosError> {
        self.io.as_ref().map(lock).ok_or(QosError::IoNotConfigured)
    }

    /// Time between disk IO control steps.
    pub fn io_interval(&self) -> Duration {
        Duration::from_millis(self.config.io.interval_ms)
    }

    /// One disk IO control step (embedders without a thread of their own).
    pub fn io_step(&self) -> Result<(), QosError> {
        Ok(self.io()?.step()?)
    }

    /// Resolves a persisted or configured limit and applies it. The third
    /// element says why it waits (its cgroup or device does not exist yet)
    /// when it could not be applied for that reason; other failures are
    /// errors.
    fn adopt_io(
        hierarchy: &Hierarchy,
        ctl: &mut IoControl,
        cgroup: &str,
        device: &str,
        limits: IoLimits,
    ) -> Result<(String, Device, Option<String>), QosError> {
        let (name, _) = hierarchy.controller_path("blkio", cgroup)?;
        let dev = Device::parse(device)?;
        match ctl.set(&name, dev, limits) {
            Ok(()) => Ok((name, dev, None)),
            Err(BlkioError::NoCgroup { .. }) => {
                Ok((name, dev, Some("cgroup does not exist yet".into())))
            }
            // `dev` parsed: a device error now means it is not on the host.
            Err(BlkioError::Device { .. }) => {
                Ok((name, dev, Some(format!("device {dev} does not exist yet"))))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sets (or replaces) a cgroup's IO limits on a device, persists them
    /// and returns the cgroup's canonical name and the device's number.
    /// Refused limits change nothing.
    pub fn set_io_limits(
        &mut self,
        cgroup: &str,
        device: &str,
        limits: IoLimits,
    ) -> Result<(String, Device), QosError> {
        if self.io.is_none() {
            return Err(QosError::IoNotConfigured);
        }
        let (name, _) = self.hierarchy.controller_path("blkio", cgroup)?;
        let dev = Device::resolve(device)?;
        self.io()?.check(&name, dev, &limits)?;
        let key = dev.to_string();
        let mut next = self.state.clone();
        next.io
            .entry(name.clone())
            .or_default()
            .insert(key.clone(), limits);
        // Persist first: if the disk refuses, the kernel is not touched.
        self.save(&next)?;
        // On failure the controller keeps the previous limits in force.
        if let Err(e) = self.io()?.set(&name, dev, limits) {
            self.save(&self.state)?;
            return Err(e.into());
        }
        self.state = next;
        Ok((name, dev))
    }

    /// Removes a cgroup's IO limits on a device, or on every device when
    /// `device` is None (also limits waiting for their cgroup or device).
    /// Returns the cgroup's canonical name.
    pub fn unset_io_limits(
        &mut self,
        cgroup: &str,
        device: Option<&str>,
    ) -> Result<String, QosError> {
        if self.io.is_none() {
            return Err(QosError::IoNotConfigured);
        }
        // The cgroup or the device may be gone already: find the limits by
        // name and number.
        let (name, _) = self.hierarchy.controller_path("blkio", cgroup)?;
        let dev = device.map(Device::parse).transpose()?;
        let not_configured = || BlkioError::NotConfigured {
            cgroup: name.clone(),
            device: dev.map_or("any device".into(), |d| d.to_string()),
        };
        let Some(devices) = self.state.io.get(&name) else {
            return Err(not_configured().into());
        };
        let mut next = self.state.clone();
        match dev {
            Some(d) => {
                if !devices.contains_key(&d.to_string()) {
                    return Err(not_configured().into());
                }
                if let Some(m) = next.io.get_mut(&name) {
                    m.remove(&d.to_string());
                    if m.is_empty() {
                        next.io.remove(&name);
                    }
                }
            }
            None => {
                next.io.remove(&name);
            }
        }
        self.save(&next)?;
        let removed = {
            let mut ctl = self.io()?;
            let applied = ctl
                .configured()
                .iter()
                .any(|(n, d, _)| *n == name && dev.is_none_or(|x| x == *d));
            // Limits waiting for their cgroup or device are not in force.
            if applied {
                ctl.remove(&name, dev)
            } else {
                Ok(())
            }
        };
        // The controller forgot them even if clearing a kernel file failed.
        self.state = next;
        removed?;
        Ok(name)
    }

    pub fn io_status(&self) -> Result<blkio::IoStatus, QosError> {
        Ok(self.io()?.status())
    }

    /// IO limits in the desired state that are not in force (cgroup or
    /// device missing), as (cgroup, device).
    fn io_waiting(&self) -> Vec<(String, String)> {
        let Some(io) = &self.io else {
            return Vec::new();
        };
        let configured: Vec<(String, Device)> = lock(io)
            .configured()
            .into_iter()
            .map(|(n, d, _)| (n, d))
            .collect();
        self.state
            .io
            .iter()
            .flat_map(|(name, devs)| devs.keys().map(move |d| (name.clone(), d.clone())))
            .filter(|(name, d)| {
                !Device::parse(d).is_ok_and(|d| configured.contains(&(name.clone(), d)))
            })
            .collect()
    }

    /// Takes limits whose cgroup or device vanished out of force (they
    /// wait in the desired state) and applies waiting limits whose cgroup
    /// and device (re)appeared.
    fn reconcile_io(&mut self) {
        let Some(io) = self.io.clone() else { return };
        let mut failed = Vec::new();
        let mut vanished = Vec::new();
        self.reconcile_io_with(&mut lock(&io), &mut failed, &mut vanished);
        for kind in failed {
            self.degrade(kind);
        }
        self.io_vanished.extend(vanished);
    }

    fn reconcile_io_with(
        &self,
        ctl: &mut IoControl,
        failed: &mut Vec<&'static str>,
        vanished: &mut Vec<(String, String)>,
    ) {
        for (name, dev, _) in ctl.configured() {
            let cgroup_gone = self
                .hierarchy
                .controller_path("blkio", &name)
                .is_ok_and(|(_, p)| !p.is_dir());
            let device_gone = Device::resolve(&dev.to_string()).is_err();
            if cgroup_gone || device_gone {
                if let Err(e) = ctl.remove(&name, Some(dev)) {
                    warn!(cgroup = %name, device = %dev, error = %e, "clearing IO limits of a vanished cgroup or device");
                    failed.push("io_clear");
                }
                if cgroup_gone {
                    vanished.push((name.clone(), dev.to_string()));
                }
                info!(cgroup = %name, device = %dev, "cgroup or device vanished; its IO limits wait for it to reappear");
            }
        }
        let configured: BTreeMap<(String, Device), IoLimits> = ctl
            .configured()
            .into_iter()
            .map(|(n, d, l)| ((n, d), l))
            .collect();
        for (name, devs) in &self.state.io {
            for (device, limits) in devs {
                let Ok(dev) = Device::parse(device) else {
                    continue;
                };
                if configured.contains_key(&(name.clone(), dev)) {
                    continue;
                }
                let present = self
                    .hierarchy
                    .controller_path("blkio", name)
                    .is_ok_and(|(_, p)| p.is_dir())
                    && Device::resolve(device).is_ok();
                if !present {
                    continue;
                }
                match ctl.set(name, dev, *limits) {
                    Ok(()) => {
                        info!(cgroup = %name, device = %dev, "cgroup and device present; IO limits applied")
                    }
                    Err(e) => {
                        warn!(cgroup = %name, device = %dev, error = %e, "applying waiting IO limits");
                        failed.push("io_apply");
                    }
                }
            }
        }
    }

    pub fn status(&self) -> Status {
        let net = self.net.as_ref().map(|n| {
            let s = n.settings();
            NetSummary {
                interface: s.interface.clone(),
                capacity: s.capacity.to_string(),
                classes: n.configured(),
                guaranteed: qos_core::units::format_bps(n.guaranteed_bits() as f64),
                ingress_capacity: s.ingress_capacity.map(|r| r.to_string()),
                ingress_guaranteed: n
                    .ingress_guaranteed_bits()
                    .map(|b| qos_core::units::format_bps(b as f64)),
                tagged_interfaces: n.tagged_interfaces(),
            }
        });
        let mem = self.mem.as_ref().map(|m| {
            let emc = lock(m);
            let st = emc.status();
            MemSummary {
                backend: st.backend,
                scope: st.scope,
                capacity: st.capacity,
                level: st.level.to_string(),
                quotas: st.cgroups.len(),
                guaranteed: st.guaranteed,
                woken_by: self.mem_woken_by.clone(),
            }
        });
        let io = self.io.as_ref().map(|io| {
            let ctl = lock(io);
            IoSummary {
                mode: ctl.mode().to_string(),
                limits: ctl.configured().len(),
            }
        });
        let mut waiting: Vec<String> = self.waiting().into_iter().map(|(name, _)| name).collect();
        if let Some(m) = &self.mem {
            waiting.extend(
                lock(m)
                    .waiting()
                    .into_iter()
                    .map(|n| format!("{n} (memory)")),
            );
        }
        waiting.extend(
            self.io_waiting()
                .into_iter()
                .map(|(n, d)| format!("{n} on {d} (io)")),
        );
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            cgroup_mode: self.hierarchy.mode().to_string(),
            cgroup2_root: self
                .hierarchy
                .unified_root()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            net,
            mem,
            io,
            waiting,
            state_file: self.store.as_ref().map(|s| s.path().display().to_string()),
        }
    }

    /// Counts an API request (the socket server calls this).
    pub fn count_request(&mut self, ok: bool) {
        self.requests += 1;
        if !ok {
            self.request_errors += 1;
        }
    }

    /// Records how long a control step took (health metrics).
    pub fn record_step(&mut self, took: Duration) {
        self.step_last = took;
        self.step_max = self.step_max.max(took);
    }

    /// Counts a degradation: something qosd could not do and logged.
    pub fn degrade(&mut self, kind: &str) {
        *self.degradations.entry(kind.to_owned()).or_default() += 1;
    }

    /// Every per-cgroup counter and the daemon's health, read now.
    pub fn snapshot(&self) -> metrics::Snapshot {
        use metrics::{CgroupMetrics, IoMetrics, MemMetrics, NetMetrics};
        let mut cgroups: BTreeMap<String, CgroupMetrics> = BTreeMap::new();
        let mut net_entries = 0;
        if let Some(net) = &self.net {
            let st = net.status();
            let class = |c: &netqos::NetClassStatus| NetMetrics {
                bytes: c.bytes,
                packets: c.packets,
                drops: c.drops,
                ce_marks: c.ce_marks,
                window_clamps: c.window_clamps,
                initial_windows: c.initial_windows,
                guarantee_bps: c
                    .rate
                    .parse::<qos_core::Rate>()
                    .map_or(0, |r| r.bits_per_sec()),
                alloc_bps: c.alloc_bps,
                unheld_bytes: c.unheld_bytes,
                held_at_alloc: c.held_at_alloc,
                multiplier: c.pacing_multiplier,
            };
            for c in &st.classes {
                cgroups.entry(c.cgroup.clone()).or_default().egress = Some(class(c));
            }
            for c in st.ingress.iter().flat_map(|i| &i.classes) {
                cgroups.entry(c.cgroup.clone()).or_default().ingress = Some(class(c));
            }
            net_entries = net.cgroup_map_entries();
        }
        if let Some(io) = &self.io {
            for g in lock(io).status().groups {
                let m = cgroups
                    .entry(g.cgroup.clone())
                    .or_default()
                    .io
                    .get_or_insert_with(IoMetrics::default);
                m.written_bytes += g.written_back_bytes + g.direct_bytes;
                m.read_bytes += g.charged_read_bytes;
                m.dirtied_bytes += g.dirtied_bytes;
                m.debt_bytes += g.debt_bytes;
                if g.state != blkio::policy::Enforce::Running {
                    m.throttled_devices += 1;
                }
            }
        }
        if let Some(mem) = &self.mem {
            for c in lock(mem).status().cgroups {
                cgroups.entry(c.name.clone()).or_default().mem = Some(MemMetrics {
                    usage_bytes: c.usage,
                    guarantee_bytes: c.guarantee,
                    cap_bytes: c.cap,
                    reclaimed_bytes: c.counters.reclaimed_bytes,
                    caps: c.counters.caps,
                    kills: c.counters.kills,
                    psi_some10: c.psi_some10,
                });
            }
        }
        metrics::Snapshot {
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            daemon: metrics::Health {
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_secs: self.started.elapsed().as_secs(),
                resident_bytes: metrics::resident_bytes(),
                requests: self.requests,
                request_errors: self.request_errors,
                waiting: self.status().waiting.len() as u64,
                net_cgroup_entries: net_entries as u64,
                control_step_last_ms: self.step_last.as_secs_f64() * 1000.0,
                control_step_max_ms: self.step_max.as_secs_f64() * 1000.0,
                degradations: self.degradations.clone(),
            },
            cgroups,
        }
    }

    /// One control step. Call every [`netqos::TICK`].
    pub fn tick(&mut self) -> Result<(), QosError> {
        if let Some(net) = self.net.as_mut() {
            net.tick()?;
        }
        if self.last_cgroup_check.elapsed() >= CGROUP_CHECK {
            self.last_cgroup_check = Instant::now();
            self.reconcile_cgroups();
            self.reconcile_io();
            self.forget_vanished();
            self.check_interface();
        }
        Ok(())
    }

    /// Quotas whose cgroup does not exist (yet, or any more).
    fn waiting(&self) -> Vec<(String, NetQuota)> {
        let Some(net) = &self.net else {
            return Vec::new();
        };
        self.state
            .net
            .iter()
            .filter(|(k, _)| net.quota(k).is_none())
            .map(|(k, q)| (k.clone(), *q))
            .collect()
    }

    /// Drops datapath entries of cgroups that vanished (and, unless
    /// `follow_recreated_cgroups`, their quotas) and applies quotas whose
    /// cgroup (re)appeared.
    fn reconcile_cgroups(&mut self) {
        let follow = self.config.daemon.follow_recreated_cgroups;
        let Some(net) = self.net.as_mut() else { return };
        let mut failed = Vec::new();
        let mut forget = Vec::new();
        for name in net.vanished() {
            match net.remove(&name) {
                Ok(_) if follow => {
                    info!(cgroup = %name, "cgroup vanished; its quota waits for it to reappear")
                }
                Ok(_) => {
                    info!(cgroup = %name, "cgroup vanished; its quota is dropped");
                    forget.push(name);
                }
                Err(e) => {
                    warn!(cgroup = %name, error = %e, "removing a vanished cgroup");
                    failed.push("net_remove");
                }
            }
        }
        // Includes those just removed: a cgroup re-created under the same
        // name gets its quota back in the same step.
        let waiting = self.waiting();
        if let Some(net) = self.net.as_mut() {
            for (name, quota) in waiting {
                if let Ok(cg) = self.hierarchy.resolve(&name) {
                    match net.set(&cg, quota) {
                        Ok(()) => info!(cgroup = %name, "cgroup appeared; quota applied"),
                        Err(e) => {
                            warn!(cgroup = %name, error = %e, "applying a waiting quota");
                            failed.push("net_apply");
                        }
                    }
                }
            }
        }
        for kind in failed {
            self.degrade(kind);
        }
        if !forget.is_empty() {
            for name in forget {
                self.state.net.remove(&name);
            }
            if let Err(e) = self.persist() {
                warn!(error = %e, "persisting dropped quotas");
                self.degrade("persist");
            }
        }
    }

    /// Counts the shaped interface going away or failing to be followed.
    fn check_interface(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        match net.check_interface() {
            netqos::InterfaceEvent::Missing => self.degrade("net_interface_missing"),
            netqos::InterfaceEvent::Failed(_) => self.degrade("net_interface_attach"),
            netqos::InterfaceEvent::Followed(_) | netqos::InterfaceEvent::Unchanged => {}
        }
    }

    /// Without `follow_recreated_cgroups`: memory quotas and IO limits of
    /// cgroups that were in force and vanished are dropped.
    fn forget_vanished(&mut self) {
        if self.config.daemon.follow_recreated_cgroups {
            return;
        }
        let mut changed = false;
        if let Some(mem) = self.mem.clone() {
            let mut emc = lock(&mem);
            for name in emc.waiting() {
                if self.mem_seen.contains(&name) && self.state.mem.remove(&name).is_some() {
                    let _ = emc.remove(&name);
                    info!(cgroup = %name, "cgroup vanished; its memory quota is dropped");
                    changed = true;
                }
            }
            let waiting = emc.waiting();
            self.mem_seen = self
                .state
                .mem
                .keys()
                .filter(|n| !waiting.contains(n))
                .cloned()
                .collect();
        }
        for (name, device) in std::mem::take(&mut self.io_vanished) {
            if let Some(devs) = self.state.io.get_mut(&name) {
                devs.remove(&device);
                if devs.is_empty() {
                    self.state.io.remove(&name);
                }
                info!(cgroup = %name, %device, "cgroup vanished; its IO limits are dropped");
                changed = true;
            }
        }
        if changed && let Err(e) = self.persist() {
            warn!(error = %e, "persisting dropped quotas");
            self.degrade("persist");
        }
    }

    fn save(&self, st: &DesiredState) -> Result<(), QosError> {
        match &self.store {
            Some(s) => s.save(st),
            None => Ok(()),
        }
    }

    fn persist(&self) -> Result<(), QosError> {
        self.save(&self.state)
    }

    /// Stops the controllers for a restart. Pinned datapaths (a daemon's)
    /// stay attached with their last rates, IO limits stay in the cgroup
    /// files (paused writers are thawed), and the next start adopts them;
    /// memory elasticity pauses (caps lifted, the OOM killer released: no
    /// task may wait for a daemon that is not there; guarantees and hard
    /// limits stay). Unpinned (ephemeral) subsystems remove what they put
    /// in the kernel, as [`Qos::cleanup`]. The desired state stays on disk.
    /// Afterwards the calls answer "not configured".
    pub fn shutdown(&mut self) {
        let pinned = self.store.is_some();
        if let Some(net) = self.net.take() {
            if pinned { net.keep() } else { net.stop() }
        }
        if let Some(mem) = self.mem.take() {
            lock(&mem).stop();
        }
        if let Some(io) = self.io.take() {
            if pinned {
                lock(&io).keep();
            } else {
                lock(&io).stop();
            }
        }
    }

    /// Stops every subsystem and removes everything of ours from the
    /// kernel: attachments, pins (other builds' too), IO limits, memory
    /// caps. The desired state stays on disk.
    pub fn cleanup(&mut self) {
        if let Some(net) = self.net.take() {
            net.stop();
        }
        if let Some(mem) = self.mem.take() {
            lock(&mem).stop();
        }
        if let Some(io) = self.io.take() {
            lock(&io).stop();
        }
        remove_pins(&self.config.daemon.bpf_pin_dir);
    }
}

/// Detaches and unpins every datapath generation under a pin root (of any
/// build), then removes the root. For `qosd --cleanup` when no daemon can
/// start (the interface is gone, the config changed).
pub fn remove_pins(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        if let Some(name) = e.file_name().to_str() {
            let g = qos_core::pin::Generation::at(&e.path());
            info!(pin = %root.join(name).display(), "removing");
            netqos::datapath::retire(&g, true);
        }
    }
    if let Err(e) = std::fs::remove_dir(root)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(pin = %root.display(), error = %e, "removing the pin directory");
    }
}

/// A poisoned lock still guards consistent data here (every step leaves
/// the controller usable), so it is taken over rather than propagated.
fn lock<T>(m: &Arc<Mutex<T>>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
