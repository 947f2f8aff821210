//! [`IoControl`]: per-cgroup IO limits applied through the kernel and, on
//! v1 hosts, made to hold for buffered writes with the tracker.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    path::PathBuf,
    time::{Duration, Instant},
};

use qos_common::io::{InodeKey, IoCounters};
use qos_core::cgroup::Hierarchy;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    Backend, BlkioError, Device, IoLimits, IoMode, Tracker,
    flush::{FlushItem, FlushOutcome, FlushWorker, Placement},
    policy::{
        CapacityEstimate, Enforce, flush_chunk, next_debt, next_enforce, watermarks, weight_shares,
    },
    tracker,
};

/// Tunables of the IO loop.
#[derive(Clone, Debug, PartialEq)]
pub struct IoSettings {
    /// Time between steps.
    pub interval: Duration,
    /// Starting point of the device capacity estimate (weights → rates).
    pub initial_capacity: u64,
    /// File listing the cgroups whose writers this controller paused, kept
    /// current: a controller that dies (SIGKILL) cannot thaw them, the next
    /// one thaws what the file lists. `None`: not recorded.
    pub paused_record: Option<PathBuf>,
    /// bpffs directory where the tracker is pinned, so that it counts on
    /// while the daemon restarts; `None`: it goes with the controller.
    pub pin_root: Option<PathBuf>,
}

impl Default for IoSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            initial_capacity: 64 << 20,
            paused_record: None,
            pin_root: None,
        }
    }
}

/// Ranges of a shared file looked at per step, at most.
const MAX_SHARED_RANGES: u64 = 8192;
/// A group counts as busy this long after it last had something to write.
const BUSY_LINGER: Duration = Duration::from_secs(1);
/// Write rates are rewritten only when they move by more than this.
const RATE_HYSTERESIS: f64 = 0.02;

#[derive(Debug)]
struct Group {
    limits: IoLimits,
    /// The cgroup's id in the io hierarchy.
    id: u64,
    state: Enforce,
    debt: u64,
    pending: u64,
    busy: bool,
    /// Last step in which it had dirty pages or wrote.
    last_active: Option<Instant>,
    /// Effective write rate (limit, or weight share).
    rate: Option<u64>,
    applied_rate: Option<u64>,
    last: IoCounters,
    write_bps: f64,
    /// `write_bps` smoothed over about a quarter second (writes come in
    /// chunk-sized lumps).
    write_bps_avg: f64,
    leaked_bps: f64,
    degraded: Option<String>,
}

/// One cgroup's IO on one device, as reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub cgroup: String,
    pub device: Device,
    pub limits: IoLimits,
    /// Write rate in force (the limit, or the weight's share of the device).
    pub effective_write_bps: Option<u64>,
    pub state: Enforce,
    /// Bytes dirtied and not yet written back.
    pub pending_bytes: u64,
    /// Bytes the kernel flusher wrote for it unthrottled, not yet repaid.
    pub debt_bytes: u64,
    pub dirtied_bytes: u64,
    pub written_back_bytes: u64,
    pub leaked_bytes: u64,
    pub charged_write_bytes: u64,
    pub charged_read_bytes: u64,
    pub direct_bytes: u64,
    pub shared_inodes: u64,
    /// Recent write rate at the block layer (written back + direct).
    pub write_bps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceAttribution {
    pub device: Device,
    pub file_write_bytes: u64,
    pub attributed_bytes: u64,
    /// attributed / file writes, percent.
    pub attributed_pct: f64,
    pub other_write_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_estimate_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackerStatus {
    pub kernel: String,
    /// Upper bound of the maps' memory (keys + values).
    pub map_memory_bytes: u64,
    /// (map, entries in use, capacity).
    pub entries: Vec<(String, usize, u32)>,
    pub devices: Vec<DeviceAttribution>,
    pub programs: Vec<tracker::ProgramCost>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IoStatus {
    pub mode: IoMode,
    pub mode_description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracker: Option<TrackerStatus>,
    pub groups: Vec<GroupStatus>,
    pub events: Vec<String>,
}

pub struct IoControl {
    backend: Backend,
    tracker: Option<Tracker>,
    settings: IoSettings,
    groups: BTreeMap<(String, Device), Group>,
    workers: BTreeMap<String, FlushWorker>,
    frozen: BTreeSet<String>,
    capacity: BTreeMap<Device, CapacityEstimate>,
    /// Per device: `io_ticks` at the last step.
    busy_ms: BTreeMap<Device, u64>,
    /// io cgroup id → name.
    names: HashMap<u64, String>,
    last_step: Instant,
    events: VecDeque<String>,
}

impl std::fmt::Debug for IoControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoControl")
            .field("mode", &self.backend.mode())
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

const MAX_EVENTS: usize = 64;

impl IoControl {
    /// Detects the mode and loads the tracker. On v1 hosts the tracker is
    /// required (it is what makes buffered-write limits hold); on v2 hosts
    /// it only verifies, and a failure to load it is logged.
    pub fn start(h: &Hierarchy, settings: IoSettings) -> Result<Self, BlkioError> {
        let backend = Backend::detect(h)?;
        let tracker = match (Tracker::open(settings.pin_root.as_deref()), backend.mode()) {
            (Ok(t), _) => Some(t),
            (Err(e), IoMode::V1Assisted) => return Err(e),
            (Err(e), IoMode::V2Kernel) => {
                warn!(error = %e, "writeback tracker unavailable: attribution is not verified");
                None
            }
        };
        info!(mode = %backend.mode(), "IO control started");
        Ok(Self::with_parts(backend, tracker, settings))
    }

    /// Thaws the writers an earlier controller paused and could not thaw
    /// (it was killed), as its record lists them; then clears the record.
    fn thaw_recorded(&self) {
        let Some(path) = &self.settings.paused_record else {
            return;
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        for name in text.lines().filter(|l| !l.trim().is_empty()) {
            match self.backend.set_frozen(name, false) {
                Ok(()) => info!(cgroup = name, "thawed writers a previous qosd left paused"),
                Err(e) => {
                    warn!(cgroup = name, error = %e, "thawing writers a previous qosd left paused")
                }
            }
        }
        self.record_paused();
    }

    /// Pauses or resumes the writers of `name`, keeping the record a
    /// superset of what is frozen at every instant: a pause is recorded
    /// before the freeze and a resume after the thaw, so a qosd killed
    /// between the two leaves nothing paused that the next one would not
    /// thaw (a freeze first lost that race once in a fault run).
    fn set_paused(&mut self, name: &str, paused: bool) -> Result<(), BlkioError> {
        if paused == self.frozen.contains(name) {
            return Ok(());
        }
        if paused {
            self.frozen.insert(name.to_owned());
            self.record_paused();
            if let Err(e) = self.backend.set_frozen(name, true) {
                self.frozen.remove(name);
                self.record_paused();
                return Err(e);
            }
        } else {
            self.backend.set_frozen(name, false)?;
            self.frozen.remove(name);
            self.record_paused();
        }
        Ok(())
    }

    /// Writes the set of paused cgroups to the record (atomically).
    fn record_paused(&self) {
        let Some(path) = &self.settings.paused_record else {
            return;
        };
        let text: String = self.frozen.iter().map(|n| format!("{n}\n")).collect();
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            warn!(path = %path.display(), error = %e, "recording paused writers");
        }
    }

    /// From parts (tests: fixture backends, no tracker). Writers a killed
    /// controller left paused (`paused_record`) are thawed.
    pub fn with_parts(backend: Backend, tracker: Option<Tracker>, settings: IoSettings) -> Self {
        let ctl = Self {
            backend,
            tracker,
            settings,
            groups: BTreeMap::new(),
            workers: BTreeMap::new(),
            frozen: BTreeSet::new(),
            capacity: BTreeMap::new(),
            busy_ms: BTreeMap::new(),
            names: HashMap::new(),
            last_step: Instant::now(),
            events: VecDeque::new(),
        };
        ctl.thaw_recorded();
        ctl
    }

    pub fn mode(&self) -> IoMode {
        self.backend.mode()
    }

    pub fn interval(&self) -> Duration {
        self.settings.interval
    }

    pub fn tracker(&self) -> Option<&Tracker> {
        self.tracker.as_ref()
    }

    fn event(&mut self, text: String) {
        info!("{text}");
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(text);
    }

    fn bfq(dev: Device) -> bool {
        dev.scheduler().as_deref() == Some("bfq")
    }

    /// Validates without applying (limits, device, cgroup).
    pub fn check(&self, name: &str, dev: Device, limits: &IoLimits) -> Result<(), BlkioError> {
        limits.validate()?;
        Device::resolve(&dev.to_string())?;
        self.backend.cgroup_dir(name)?;
        Ok(())
    }

    /// Sets (or replaces) a cgroup's limits on a device. When it fails the
    /// previous limits (or none) are what stays applied.
    pub fn set(&mut self, name: &str, dev: Device, limits: IoLimits) -> Result<(), BlkioError> {
        self.check(name, dev, &limits)?;
        let id = {
            use std::os::unix::fs::MetadataExt;
            let dir = self.backend.cgroup_dir(name)?;
            std::fs::metadata(&dir).map_err(crate::io_err(&dir))?.ino()
        };
        let bfq = Self::bfq(dev);
        let rate = limits.write_bps.map(|r| r.bytes_per_sec());
        let bfq_weight = if bfq { limits.weight } else { None };
        if let Err(e) = self.backend.apply(name, dev, &limits, rate, bfq_weight) {
            let restored = match self.groups.get(&(name.to_owned(), dev)) {
                Some(prev) => self.backend.apply(
                    name,
                    dev,
                    &prev.limits,
                    prev.applied_rate,
                    if bfq { prev.limits.weight } else { None },
                ),
                None => self.backend.clear(name, dev),
            };
            if let Err(r) = restored {
                warn!(cgroup = %name, device = %dev, error = %r, "previous IO limits not restored");
            }
            return Err(e);
        }
        let mut degraded = None;
        if self.mode() == IoMode::V1Assisted && !self.workers.contains_key(name) {
            let placement = Placement {
                group_tasks: self.backend.cgroup_dir(name)?.join("tasks"),
                root_tasks: self.backend.root().join("tasks"),
            };
            match FlushWorker::spawn(name, placement) {
                Ok(w) => {
                    self.workers.insert(name.to_owned(), w);
                }
                Err(e) => degraded = Some(format!("no flush helper: {e}")),
            }
        }
        let prev = self.groups.remove(&(name.to_owned(), dev));
        let last = self.counters_of(id, dev).unwrap_or_default();
        self.groups.insert(
            (name.to_owned(), dev),
            Group {
                limits,
                id,
                state: prev.as_ref().map_or(Enforce::Running, |p| p.state),
                debt: prev.as_ref().map_or(0, |p| p.debt),
                pending: 0,
                busy: false,
                last_active: None,
                rate,
                applied_rate: rate,
                last,
                write_bps: 0.0,
                write_bps_avg: 0.0,
                leaked_bps: 0.0,
                degraded,
            },
        );
        self.names.insert(id, name.to_owned());
        self.event(format!(
            "{name} on {dev}: limits set{}",
            if bfq && limits.weight.is_some() {
                " (weight by BFQ)"
            } else {
                ""
            }
        ));
        Ok(())
    }

    fn counters_of(&self, id: u64, dev: Device) -> Option<IoCounters> {
        let t = self.tracker.as_ref()?;
        t.counters().ok()?.get(&(id, dev.kernel_dev())).copied()
    }

    /// Removes a cgroup's limits on a device (all devices when `dev` is None).
    pub fn remove(&mut self, name: &str, dev: Option<Device>) -> Result<(), BlkioError> {
        let keys: Vec<(String, Device)> = self
            .groups
            .keys()
            .filter(|(n, d)| n == name && dev.is_none_or(|x| x == *d))
            .cloned()
            .collect();
        if keys.is_empty() {
            return Err(BlkioError::NotConfigured {
                cgroup: name.into(),
                device: dev.map_or("any device".into(), |d| d.to_string()),
            });
        }
        // Forget and clean up everything, then report the first failure.
        let mut result = Ok(());
        for key in keys {
            self.groups.remove(&key);
            if let Err(e) = self.backend.clear(&key.0, key.1) {
                result = result.and(Err(e));
            }
            self.event(format!("{} on {}: limits removed", key.0, key.1));
        }
        if !self.groups.keys().any(|(n, _)| n == name) {
            self.workers.remove(name);
            if self.frozen.remove(name) {
                let _ = self.backend.set_frozen(name, false);
                self.record_paused();
            }
        }
        result
    }

    /// Configured (cgroup, device) pairs.
    pub fn configured(&self) -> Vec<(String, Device, IoLimits)> {
        self.groups
            .iter()
            .map(|((n, d), g)| (n.clone(), *d, g.limits))
            .collect()
    }

    /// One control step: read the tracker, decide, flush, pause.
    pub fn step(&mut self) -> Result<(), BlkioError> {
        let now = Instant::now();
        let dt = now.duration_since(self.last_step).as_secs_f64().max(1e-3);
        self.last_step = now;
        let Some(tracker) = self.tracker.as_mut() else {
            return Ok(());
        };
        for (name, w) in &self.workers {
            for outcome in w.take_outcomes() {
                match outcome {
                    FlushOutcome::Flushed(item) => {
                        tracing::trace!(cgroup = %name, ino = item.key.ino, "flushed");
                        let _ = tracker.settle(item.key, item.dirtied, &item.ranges);
                    }
                    FlushOutcome::Gone(key) => {
                        let _ = tracker.forget(key);
                    }
                    FlushOutcome::Failed(key) => {
                        tracing::debug!(cgroup = %name, ino = key.ino, "flush failed");
                    }
                }
            }
        }
        let counters = tracker.counters()?;
        let inodes = tracker.inodes()?;
        let devices: BTreeSet<u32> = self.groups.keys().map(|(_, d)| d.kernel_dev()).collect();

        // Dirty work per io cgroup id: pending bytes per device and items.
        let mut pending: HashMap<(u64, u32), u64> = HashMap::new();
        let mut work: HashMap<u64, Vec<FlushItem>> = HashMap::new();
        for (key, info) in &inodes {
            if !devices.contains(&key.dev) || info.pending == 0 {
                continue;
            }
            if info.other == 0 {
                *pending.entry((info.owner, key.dev)).or_default() += info.pending;
                work.entry(info.owner).or_default().push(FlushItem {
                    key: *key,
                    generation: info.generation,
                    dirtied: info.dirtied,
                    ranges: Vec::new(),
                    chunk: 0,
                });
                continue;
            }
            // Shared file: flush each cgroup's own ranges only.
            let mut by_owner: HashMap<u64, Vec<u64>> = HashMap::new();
            for (range, r) in tracker.pending_ranges(*key, info.max_range.min(MAX_SHARED_RANGES)) {
                *pending.entry((r.owner, key.dev)).or_default() += r.pending;
                by_owner.entry(r.owner).or_default().push(range);
            }
            for (owner, ranges) in by_owner {
                work.entry(owner).or_default().push(FlushItem {
                    key: *key,
                    generation: info.generation,
                    dirtied: info.dirtied,
                    ranges,
                    chunk: 0,
                });
            }
        }

        // Counters and rates per group.
        for ((_, dev), g) in self.groups.iter_mut() {
            let c = counters
                .get(&(g.id, dev.kernel_dev()))
                .copied()
                .unwrap_or_default();
            let wrote =
                (c.written_back + c.direct).saturating_sub(g.last.written_back + g.last.direct);
            let leaked = c.leaked.saturating_sub(g.last.leaked);
            g.write_bps = wrote as f64 / dt;
            let alpha = (dt / 0.25).min(1.0);
            g.write_bps_avg += alpha * (g.write_bps - g.write_bps_avg);
            g.leaked_bps = leaked as f64 / dt;
            g.pending = pending.get(&(g.id, dev.kernel_dev())).copied().unwrap_or(0);
            if g.pending > 0 || wrote > 0 {
                g.last_active = Some(now);
            }
            // Writes arrive in lumps: a step without any does not make a
            // group idle (it would get a whole device's rate for a moment).
            g.busy = g
                .last_active
                .is_some_and(|t| now.duration_since(t) < BUSY_LINGER);
            g.debt = next_debt(g.debt, leaked, g.rate, g.state == Enforce::Repaying, dt);
            g.last = c;
        }

        // Weights become rates over the device's estimated capacity, unless
        // BFQ schedules the device.
        if self.mode() == IoMode::V1Assisted {
            let devs: BTreeSet<Device> = self.groups.keys().map(|(_, d)| *d).collect();
            for dev in devs {
                if Self::bfq(dev) {
                    continue;
                }
                // (name, weight, busy) of the weighted groups on the device,
                // with what the busy ones delivered and whether all had more.
                let mut members: Vec<(String, u32, bool)> = Vec::new();
                // A device busy nearly all the step is the limit: its
                // direct writers cannot show a backlog otherwise.
                let busy_ms = dev.busy_ms();
                let device_full = match (busy_ms, self.busy_ms.get(&dev)) {
                    (Some(now_ms), Some(&before)) => {
                        now_ms.saturating_sub(before) as f64 >= 0.9 * dt * 1000.0
                    }
                    _ => false,
                };
                if let Some(ms) = busy_ms {
                    self.busy_ms.insert(dev, ms);
                }
                let (mut delivered, mut allowed, mut backlogged) = (0.0, 0.0, true);
                for ((n, d), g) in &self.groups {
                    let Some(w) = g.limits.weight.filter(|_| *d == dev) else {
                        continue;
                    };
                    if g.busy {
                        delivered += g.write_bps;
                        // Buffered writers show a backlog in the page cache;
                        // direct writers one by using all of their rate.
                        let held = g
                            .applied_rate
                            .is_some_and(|r| g.write_bps_avg >= 0.85 * r as f64);
                        backlogged &= g.pending > 0 || held || device_full;
                        allowed += g.applied_rate.unwrap_or(0) as f64;
                    }
                    members.push((n.clone(), w, g.busy));
                }
                if members.is_empty() {
                    continue;
                }
                let initial = self.settings.initial_capacity;
                let est = self
                    .capacity
                    .entry(dev)
                    .or_insert_with(|| CapacityEstimate::new(initial, 1 << 20));

                if est.update(delivered, allowed, backlogged, dt) {
                    tracing::debug!(device = %dev, capacity_bps = est.bps(), "device capacity estimate");
                }
                let cap = est.bps();
                let weights: Vec<(u32, bool)> = members.iter().map(|(_, w, b)| (*w, *b)).collect();
                let shares = weight_shares(cap, &weights);
                for ((name, _, busy), share) in members.iter().zip(shares) {
                    if let Some(g) = self.groups.get_mut(&(name.clone(), dev)) {
                        let limit = g.limits.write_bps.map(|r| r.bytes_per_sec());
                        // An idle group keeps a full share ready for when it wakes.
                        let share = if *busy { share } else { cap };
                        g.rate = Some(limit.map_or(share, |l| l.min(share)).max(1 << 16));
                    }
                }
            }
            for ((name, dev), g) in self.groups.iter_mut() {
                let moved = match (g.rate, g.applied_rate) {
                    (Some(a), Some(b)) => (a as f64 - b as f64).abs() > RATE_HYSTERESIS * b as f64,
                    (a, b) => a != b,
                };
                if moved {
                    match self.backend.set_write_rate(name, *dev, g.rate) {
                        Ok(()) => g.applied_rate = g.rate,
                        Err(e) => g.degraded = Some(e.to_string()),
                    }
                }
            }
        }

        if self.mode() != IoMode::V1Assisted {
            return Ok(());
        }
        // Enforcement states, then per cgroup: pause writers, flush.
        let mut pause: BTreeMap<String, bool> = BTreeMap::new();
        let mut allow_flush: BTreeMap<String, bool> = BTreeMap::new();
        let mut ids: BTreeMap<String, u64> = BTreeMap::new();
        let mut transitions = Vec::new();
        for ((name, dev), g) in self.groups.iter_mut() {
            let writes_limited = g.rate.is_some() || g.limits.write_iops.is_some();
            let next = if writes_limited {
                next_enforce(g.state, g.pending, g.debt, watermarks(g.rate))
            } else {
                Enforce::Running
            };
            if next != g.state {
                transitions.push(format!(
                    "{name} on {dev}: {:?} → {:?} (pending {} KiB, debt {} KiB)",
                    g.state,
                    next,
                    g.pending >> 10,
                    g.debt >> 10
                ));
                g.state = next;
            }
            *pause.entry(name.clone()).or_default() |= next.writers_paused();
            *allow_flush.entry(name.clone()).or_insert(true) &= next.flush_allowed();
            ids.insert(name.clone(), g.id);
        }
        for t in transitions {
            tracing::debug!("{t}");
        }
        for (name, paused) in pause {
            if let Err(e) = self.set_paused(&name, paused) {
                for ((n, _), g) in self.groups.iter_mut() {
                    if *n == name {
                        g.degraded = Some(format!("writers cannot be paused: {e}"));
                    }
                }
            }
        }
        for (name, id) in ids {
            let Some(worker) = self.workers.get(&name) else {
                continue;
            };
            if !allow_flush.get(&name).copied().unwrap_or(true) || worker.busy() {
                continue;
            }
            if let Some(mut items) = work.remove(&id)
                && !items.is_empty()
            {
                for item in &mut items {
                    let rate = self
                        .groups
                        .get(&(name.clone(), Device::from_kernel_dev(item.key.dev)))
                        .and_then(|g| g.rate);
                    item.chunk = flush_chunk(rate);
                }
                tracing::trace!(cgroup = %name, files = items.len(), "flush submitted");
                worker.submit(items);
            }
        }
        Ok(())
    }

    pub fn status(&self) -> IoStatus {
        let tracker = self.tracker.as_ref().map(|t| {
            let devices = t
                .devices()
                .unwrap_or_default()
                .into_iter()
                .map(|(dev, c)| {
                    let device = Device::from_kernel_dev(dev);
                    DeviceAttribution {
                        device,
                        file_write_bytes: c.file_write,
                        attributed_bytes: c.attributed,
                        attributed_pct: if c.file_write == 0 {
                            100.0
                        } else {
                            100.0 * c.attributed as f64 / c.file_write as f64
                        },
                        other_write_bytes: c.other_write,
                        capacity_estimate_bps: self.capacity.get(&device).map(|e| e.bps()),
                        scheduler: device.scheduler(),
                    }
                })
                .collect();
            TrackerStatus {
                kernel: t.kernel().to_owned(),
                map_memory_bytes: tracker::map_memory_bytes(),
                entries: t
                    .entries()
                    .into_iter()
                    .map(|(n, used, cap)| (n.to_owned(), used, cap))
                    .collect(),
                devices,
                programs: t.program_costs(),
            }
        });
        let counters = self
            .tracker
            .as_ref()
            .and_then(|t| t.counters().ok())
            .unwrap_or_default();
        let groups = self
            .groups
            .iter()
            .map(|((name, dev), g)| {
                let c = counters
                    .get(&(g.id, dev.kernel_dev()))
                    .copied()
                    .unwrap_or_default();
                GroupStatus {
                    cgroup: name.clone(),
                    device: *dev,
                    limits: g.limits,
                    effective_write_bps: g.rate,
                    state: g.state,
                    pending_bytes: g.pending,
                    debt_bytes: g.debt,
                    dirtied_bytes: c.dirtied,
                    written_back_bytes: c.written_back,
                    leaked_bytes: c.leaked,
                    charged_write_bytes: c.charged_write,
                    charged_read_bytes: c.charged_read,
                    direct_bytes: c.direct,
                    shared_inodes: c.shared_inodes,
                    write_bps: g.write_bps,
                    degraded: g.degraded.clone(),
                }
            })
            .collect();
        IoStatus {
            mode: self.mode(),
            mode_description: self.mode().to_string(),
            tracker,
            groups,
            events: self.events.iter().cloned().collect(),
        }
    }

    /// Counters of any io cgroup id the tracker saw (measurement tools).
    pub fn counters_by_name(&mut self) -> HashMap<(String, Device), IoCounters> {
        let Some(t) = self.tracker.as_ref() else {
            return HashMap::new();
        };
        let counters = t.counters().unwrap_or_default();
        // Id 0: bios without a blkcg; no cgroup to look for.
        if counters
            .keys()
            .any(|(id, _)| *id != 0 && !self.names.contains_key(id))
        {
            self.names = self.backend.cgroup_ids();
        }
        counters
            .into_iter()
            .map(|((id, dev), c)| {
                let name = self
                    .names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{id}"));
                ((name, Device::from_kernel_dev(dev)), c)
            })
            .collect()
    }

    /// Removes every limit, thaws paused writers, stops the helpers.
    pub fn stop(&mut self) {
        for (name, dev) in self.groups.keys().cloned().collect::<Vec<_>>() {
            if let Err(e) = self.backend.clear(&name, dev) {
                warn!(cgroup = %name, device = %dev, error = %e, "clearing IO limits");
            }
        }
        if let Some(t) = self.tracker.take() {
            t.detach();
        }
        for name in std::mem::take(&mut self.frozen) {
            let _ = self.backend.set_frozen(&name, false);
        }
        self.record_paused();
        self.groups.clear();
        self.workers.clear();
    }
}

impl IoControl {
    /// Leaves the kernel limits in place for the next daemon (a restart),
    /// thawing paused writers: nobody would thaw them while the daemon is
    /// away. Afterwards the controller manages nothing.
    pub fn keep(&mut self) {
        for name in std::mem::take(&mut self.frozen) {
            let _ = self.backend.set_frozen(&name, false);
        }
        // A pinned tracker counts on; an unpinned one goes.
        drop(self.tracker.take());
        self.record_paused();
        self.groups.clear();
        self.workers.clear();
    }
}

impl Drop for IoControl {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs steps until `stop` is set (the daemon's IO thread, and tools).
pub fn run_loop(
    io: &std::sync::Mutex<IoControl>,
    interval: Duration,
    stop: &std::sync::atomic::AtomicBool,
) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let started = Instant::now();
        {
            let mut g = io.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = g.step() {
                warn!(error = %e, "IO step");
            }
        }
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// The key of an inode as the tracker stores it (tests, tools).
pub fn inode_key(dev: Device, ino: u64) -> InodeKey {
    InodeKey {
        dev: dev.kernel_dev(),
        _pad: 0,
        ino,
    }
}

#[cfg(test)]
mod pause_record_tests {
    use super::*;

    /// A v1 controller on the fixture hierarchies `root/blkio` and
    /// `root/freezer`, recording paused writers in `root/io-paused`.
    fn v1_with_record(root: &std::path::Path) -> IoControl {
        let backend = Backend::fixture(
            IoMode::V1Assisted,
            &root.join("blkio"),
            Some(&root.join("freezer")),
        );
        let settings = IoSettings {
            paused_record: Some(root.join("io-paused")),
            ..IoSettings::default()
        };
        IoControl::with_parts(backend, None, settings)
    }

    #[test]
    fn writers_a_killed_controller_left_paused_are_thawed() {
        let tmp = tempfile::tempdir().unwrap();
        let freezer = tmp.path().join("freezer");
        for g in ["t/a", "t/b"] {
            std::fs::create_dir_all(freezer.join(g)).unwrap();
            std::fs::create_dir_all(tmp.path().join("blkio").join(g)).unwrap();
            std::fs::write(freezer.join(g).join("freezer.state"), "FROZEN").unwrap();
        }
        let record = tmp.path().join("io-paused");
        // The dead controller had paused a (and a cgroup since removed).
        std::fs::write(&record, "t/a\nt/gone\n").unwrap();
        let _ctl = v1_with_record(tmp.path());
        let state =
            |g: &str| std::fs::read_to_string(freezer.join(g).join("freezer.state")).unwrap();
        assert_eq!(state("t/a"), "THAWED");
        // Not ours (say, paused by its owner): left alone.
        assert_eq!(state("t/b"), "FROZEN");
        assert_eq!(std::fs::read_to_string(&record).unwrap(), "");
    }

    #[test]
    fn a_pause_is_recorded_while_it_holds_and_a_failed_one_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let freezer = tmp.path().join("freezer");
        std::fs::create_dir_all(freezer.join("t/a")).unwrap();
        std::fs::create_dir_all(tmp.path().join("blkio/t/a")).unwrap();
        let record = tmp.path().join("io-paused");
        let mut ctl = v1_with_record(tmp.path());
        let recorded = || std::fs::read_to_string(&record).unwrap();
        let state = || std::fs::read_to_string(freezer.join("t/a/freezer.state")).unwrap();

        ctl.set_paused("t/a", true).unwrap();
        assert_eq!(state(), "FROZEN");
        assert_eq!(recorded(), "t/a\n");
        // Pausing again changes nothing.
        ctl.set_paused("t/a", true).unwrap();
        assert_eq!(recorded(), "t/a\n");

        // No freezer cgroup: the pause fails and the record is rolled back.
        let err = ctl.set_paused("t/missing", true).unwrap_err();
        assert!(err.to_string().contains("t/missing"), "{err}");
        assert_eq!(recorded(), "t/a\n");

        ctl.set_paused("t/a", false).unwrap();
        assert_eq!(state(), "THAWED");
        assert_eq!(recorded(), "");
    }
}
