//! The control loop: read the scope and the managed cgroups, classify the
//! host, plan ([`crate::policy`]), act through the [`Backend`], count and log
//! what was done and why.

use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use qos_core::{Hierarchy, Size};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    EmcError,
    backend::{Backend, BackendKind, CgroupMem},
    policy::{
        self, Action, CgroupView, HostSample, Level, LevelTracker, MemQuota, PlanInput, Tuning,
    },
    psi::{PsiTrigger, Waker},
};

/// Events kept for `status` and the scripts.
const EVENT_LOG: usize = 4096;

/// How the controller is set up.
#[derive(Clone, Debug, PartialEq)]
pub struct EmcSettings {
    /// A cgroup standing for the host (its limit is the capacity); `None`:
    /// the whole host (MemTotal, MemAvailable, /proc/pressure/memory).
    pub scope: Option<String>,
    /// Memory guarantees may not use (system, daemons, page cache).
    pub reserve: Size,
    pub tuning: Tuning,
    /// Time between control steps when no pressure trigger fires.
    pub interval: Duration,
    /// Hold back the kernel OOM killer in the scope cgroup, so that its
    /// tasks wait and the controller picks the victim (v1: oom_control; v2:
    /// memory.high a little under memory.max).
    pub hold_scope_oom: bool,
}

impl Default for EmcSettings {
    fn default() -> Self {
        Self {
            scope: None,
            reserve: Size::clamped(512 << 20),
            tuning: Tuning::default(),
            interval: Duration::from_millis(200),
            hold_scope_oom: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Level,
    Cap,
    Reclaim,
    ReclaimBlocked,
    Release,
    Throttled,
    Kill,
    KernelOomKill,
    Vanished,
    Appeared,
    Error,
}

/// Something the controller did or saw, with the reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number (never reused).
    pub seq: u64,
    /// Milliseconds since the controller started.
    pub t_ms: u64,
    /// Wall clock, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    pub bytes: u64,
    pub level: Level,
    pub detail: String,
}

/// Counts per cgroup (and summed for the host).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub caps: u64,
    pub releases: u64,
    pub reclaims: u64,
    pub reclaimed_bytes: u64,
    pub reclaim_blocked: u64,
    pub throttles: u64,
    pub kills: u64,
    pub kernel_oom_kills: u64,
    pub errors: u64,
}

impl Counters {
    fn add(&mut self, o: &Self) {
        self.caps += o.caps;
        self.releases += o.releases;
        self.reclaims += o.reclaims;
        self.reclaimed_bytes += o.reclaimed_bytes;
        self.reclaim_blocked += o.reclaim_blocked;
        self.throttles += o.throttles;
        self.kills += o.kills;
        self.kernel_oom_kills += o.kernel_oom_kills;
        self.errors += o.errors;
    }
}

/// The window of the PSI averages (`avg10`) the levels read.
const PSI_WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
struct Managed {
    quota: MemQuota,
    cap: Option<u64>,
    blocked_until_ms: u64,
    last: Option<CgroupMem>,
    counters: Counters,
    throttled: bool,
    /// Last step it was seen throttled at its cap.
    throttled_at: Option<Instant>,
    present: bool,
}

impl Managed {
    fn new(quota: MemQuota, present: bool) -> Self {
        Self {
            quota,
            cap: None,
            blocked_until_ms: 0,
            last: None,
            counters: Counters::default(),
            throttled: false,
            throttled_at: None,
            present,
        }
    }
}

/// Steps `emc` until `stop` is set: every `interval`, and sooner when
/// `waker` reports pressure (at most one step per 20 ms then, as
/// notifications come in bursts). The loop qosd runs on its own thread.
pub fn run_loop(emc: &Mutex<Emc>, waker: Option<&Waker>, interval: Duration, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        {
            let mut e = emc.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(err) = e.step() {
                warn!(error = %err, "memory control step");
            }
        }
        let woken = match waker {
            Some(w) => w.wait(interval),
            None => {
                std::thread::sleep(interval);
                Ok(false)
            }
        };
        match woken {
            Ok(true) => std::thread::sleep(Duration::from_millis(20)),
            Ok(false) => {}
            Err(err) => {
                warn!(error = %err, "waiting for memory pressure");
                std::thread::sleep(interval);
            }
        }
    }
}

/// One cgroup in `qosctl mem show`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemCgroupStatus {
    pub name: String,
    pub guarantee: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    pub priority: u32,
    pub usage: u64,
    pub anon: u64,
    pub file: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u64>,
    /// ok, elastic (above its guarantee), capped, throttled (waiting at its
    /// cap), missing (the cgroup does not exist).
    pub state: String,
    pub psi_some10: f64,
    pub psi_full10: f64,
    pub counters: Counters,
}

/// `qosctl mem show`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemStatus {
    /// v1 or v2.
    pub backend: String,
    /// "host" or the scope cgroup.
    pub scope: String,
    pub capacity: u64,
    pub used: u64,
    pub free_pct: f64,
    pub level: Level,
    pub psi_some10: f64,
    pub psi_full10: f64,
    pub reserve: u64,
    pub guaranteed: u64,
    /// Whether anonymous memory is reclaimable (swap).
    pub swap: bool,
    /// Whether the kernel OOM killer is held back in the scope.
    pub scope_oom_held: bool,
    pub steps: u64,
    pub cgroups: Vec<MemCgroupStatus>,
    pub totals: Counters,
    pub recent: Vec<Event>,
}

/// Elastic memory control of one host (or scope cgroup).
#[derive(Debug)]
pub struct Emc {
    backend: Backend,
    settings: EmcSettings,
    managed: BTreeMap<String, Managed>,
    tracker: LevelTracker,
    sample: HostSample,
    last_kill_ms: Option<u64>,
    epoch: Instant,
    events: VecDeque<Event>,
    next_seq: u64,
    swap: bool,
    scope_oom_held: bool,
    /// v2: the scope's memory.high before the hold.
    scope_prev_high: Option<String>,
    steps: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Emc {
    /// Detects the host's memory controller and starts controlling.
    pub fn start(hierarchy: &Hierarchy, settings: EmcSettings) -> Result<Self, EmcError> {
        let mut settings = settings;
        if let Some(scope) = &settings.scope {
            settings.scope = Some(hierarchy.controller_path("memory", scope)?.0);
        }
        Self::with_backend(Backend::detect(hierarchy)?, settings)
    }

    /// Starts over a given backend (fixtures, other hierarchies).
    pub fn with_backend(backend: Backend, settings: EmcSettings) -> Result<Self, EmcError> {
        settings.tuning.validate().map_err(EmcError::Tuning)?;
        if let Some(scope) = &settings.scope
            && !backend.exists(scope)
        {
            return Err(EmcError::NotFound {
                name: scope.clone(),
                path: backend.dir(scope),
            });
        }
        let mut emc = Self {
            swap: backend.swap_enabled(),
            backend,
            settings,
            managed: BTreeMap::new(),
            tracker: LevelTracker::default(),
            sample: HostSample::default(),
            last_kill_ms: None,
            epoch: Instant::now(),
            events: VecDeque::new(),
            next_seq: 0,
            scope_oom_held: false,
            scope_prev_high: None,
            steps: 0,
        };
        if let Some(scope) = emc.settings.scope.clone()
            && emc.settings.hold_scope_oom
        {
            // v2: the hold overwrites memory.high; what was there comes back
            // at stop.
            let prev = match emc.backend.kind() {
                BackendKind::V2 => Some(emc.backend.memory_high(&scope)?),
                BackendKind::V1 => None,
            };
            emc.scope_oom_held = emc.backend.hold_oom_killer(&scope, true)?;
            emc.scope_prev_high = prev.filter(|_| emc.scope_oom_held);
        }
        emc.sample = match emc.read_scope() {
            Ok(s) => s,
            Err(e) => {
                emc.release_scope();
                return Err(e);
            }
        };
        info!(
            backend = %emc.backend.kind(),
            scope = %emc.scope_name(),
            capacity = %policy::format_bytes(emc.sample.capacity),
            swap = emc.swap,
            oom_held = emc.scope_oom_held,
            "elastic memory control"
        );
        Ok(emc)
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn settings(&self) -> &EmcSettings {
        &self.settings
    }

    pub fn scope_name(&self) -> String {
        self.settings.scope.clone().unwrap_or_else(|| "host".into())
    }

    fn read_scope(&self) -> Result<HostSample, EmcError> {
        match &self.settings.scope {
            Some(s) => self.backend.scope_sample(s, self.scope_oom_held),
            None => self.backend.host_sample(),
        }
    }

    /// Gives the scope its OOM killer back (v1) or its own memory.high (v2).
    fn release_scope(&mut self) {
        if !self.scope_oom_held {
            return;
        }
        let Some(scope) = self.settings.scope.clone() else {
            return;
        };
        let r = match self.scope_prev_high.take() {
            Some(prev) => self.backend.restore_memory_high(&scope, &prev),
            None => self.backend.hold_oom_killer(&scope, false).map(|_| ()),
        };
        if let Err(e) = r {
            warn!(scope = %scope, error = %e, "restoring the scope's OOM killer");
        }
        self.scope_oom_held = false;
    }

    /// What wakes the loop before its timer: a PSI trigger on the scope's
    /// pressure file (100 ms of stall within 1 s) where the kernel takes
    /// one, otherwise v1 cgroup events on the scope (usage crossing the
    /// tight threshold, OOM, vmpressure). None: timer only.
    pub fn waker(&self) -> Option<Waker> {
        let psi = match &self.settings.scope {
            Some(s) => self.backend.psi_path(s),
            None => Some(self.backend.host_psi_path()),
        };
        let mut why = String::from("no pressure file");
        if let Some(path) = psi {
            match PsiTrigger::new(&path, 100_000, 1_000_000) {
                Ok(t) => return Some(Waker::Psi(t)),
                Err(e) => why = format!("{}: {e}", path.display()),
            }
        }
        if self.backend.kind() == BackendKind::V1 {
            let dir = self
                .backend
                .dir(self.settings.scope.as_deref().unwrap_or(""));
            let threshold =
                self.sample.capacity as f64 * (1.0 - self.settings.tuning.tight_free_pct / 100.0);
            if let Some(w) = Waker::v1_events(&dir, threshold as u64) {
                info!(reason = %why, waker = %w.describe(), "no PSI trigger; using cgroup v1 events");
                return Some(w);
            }
        }
        warn!(reason = %why, "nothing to wake the memory loop early; timer only");
        None
    }

    pub fn quota(&self, name: &str) -> Option<MemQuota> {
        self.managed.get(name).map(|m| m.quota)
    }

    pub fn quotas(&self) -> impl Iterator<Item = (&String, MemQuota)> {
        self.managed.iter().map(|(k, m)| (k, m.quota))
    }

    pub fn guaranteed(&self) -> u64 {
        self.managed
            .values()
            .map(|m| m.quota.guarantee.bytes())
            .sum()
    }

    /// Validates a quota and checks it against the capacity; changes nothing.
    pub fn check(&self, name: &str, quota: &MemQuota) -> Result<(), EmcError> {
        quota.validate().map_err(|reason| EmcError::Invalid {
            cgroup: name.into(),
            reason,
        })?;
        let others: u64 = self
            .managed
            .iter()
            .filter(|(k, _)| k.as_str() != name)
            .map(|(_, m)| m.quota.guarantee.bytes())
            .sum();
        policy::admit(
            name,
            &self.scope_name(),
            self.sample.capacity,
            self.settings.reserve.bytes(),
            others,
            quota.guarantee.bytes(),
        )
        .map_err(EmcError::Admission)
    }

    /// Applies a quota to an existing cgroup (by its canonical name).
    pub fn set(&mut self, name: &str, quota: MemQuota) -> Result<(), EmcError> {
        self.check(name, &quota)?;
        if !self.backend.exists(name) {
            return Err(EmcError::NotFound {
                name: name.into(),
                path: self.backend.dir(name),
            });
        }
        if self.settings.scope.as_deref() == Some(name) {
            return Err(EmcError::Invalid {
                cgroup: name.into(),
                reason: "it is the scope standing for the host".into(),
            });
        }
        self.apply(name, &quota)?;
        let m = self
            .managed
            .entry(name.into())
            .or_insert_with(|| Managed::new(quota, true));
        m.quota = quota;
        m.cap = None;
        m.present = true;
        info!(cgroup = %name, guarantee = %quota.guarantee, limit = ?quota.limit.map(|l| l.to_string()), priority = quota.priority, "memory quota");
        Ok(())
    }

    /// Registers a quota whose cgroup may not exist yet (a restart, a
    /// container not started): applied when the cgroup appears, checked
    /// every step. Admission applies all the same.
    pub fn adopt(&mut self, name: &str, quota: MemQuota) -> Result<(), EmcError> {
        if self.backend.exists(name) {
            return self.set(name, quota);
        }
        self.check(name, &quota)?;
        self.managed.insert(name.into(), Managed::new(quota, false));
        Ok(())
    }

    /// Quotas whose cgroup does not exist (yet, or any more).
    pub fn waiting(&self) -> Vec<String> {
        self.managed
            .iter()
            .filter(|(_, m)| !m.present)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn apply(&self, name: &str, quota: &MemQuota) -> Result<(), EmcError> {
        self.backend
            .set_guarantee(name, Some(quota.guarantee.bytes()))?;
        self.backend.set_cap(name, None, quota.limit_bytes())
    }

    /// Removes a cgroup's quota and everything set on it.
    pub fn remove(&mut self, name: &str) -> Result<MemQuota, EmcError> {
        let m = self
            .managed
            .remove(name)
            .ok_or_else(|| EmcError::NotConfigured(name.into()))?;
        if self.backend.exists(name) {
            self.backend.clear(name)?;
        }
        Ok(m.quota)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn event(&mut self, kind: EventKind, cgroup: Option<&str>, bytes: u64, detail: String) {
        let e = Event {
            seq: self.next_seq,
            t_ms: self.now_ms(),
            unix_ms: unix_ms(),
            kind,
            cgroup: cgroup.map(str::to_owned),
            bytes,
            level: self.tracker.level(),
            detail,
        };
        self.next_seq += 1;
        match kind {
            EventKind::Kill | EventKind::KernelOomKill | EventKind::Error => {
                warn!(kind = ?e.kind, cgroup = ?e.cgroup, bytes = e.bytes, level = %e.level, "{}", e.detail)
            }
            _ => {
                info!(kind = ?e.kind, cgroup = ?e.cgroup, bytes = e.bytes, level = %e.level, "{}", e.detail)
            }
        }
        if self.events.len() == EVENT_LOG {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// Events with a sequence number ≥ `from` still in the log.
    pub fn events_since(&self, from: u64) -> Vec<Event> {
        self.events
            .iter()
            .filter(|e| e.seq >= from)
            .cloned()
            .collect()
    }

    pub fn level(&self) -> Level {
        self.tracker.level()
    }

    /// One control step. Failures of single actions are logged and counted,
    /// not returned: the loop must go on.
    pub fn step(&mut self) -> Result<Level, EmcError> {
        self.steps += 1;
        let now = self.now_ms();
        // v2: the hold point follows the scope's memory.max (written only
        // when it changed).
        if self.scope_oom_held
            && self.backend.kind() == BackendKind::V2
            && let Some(scope) = &self.settings.scope
        {
            self.scope_oom_held = self.backend.hold_oom_killer(scope, true)?;
        }
        self.sample = self.read_scope()?;
        self.observe_cgroups();
        // cgroup2: a cgroup throttled at the memory.high we set stalls by
        // design, and the scope's PSI counts that stall. While the scope has
        // room, the stall is ours, not the host's: counted, it would hold
        // the level up and with it the cap that causes it (v1 caps make
        // tasks wait in a held OOM, which PSI does not count).
        // PSI averages over 10 s: a stall we caused lingers in it that long.
        let ours = |m: &Managed| m.throttled_at.is_some_and(|t| t.elapsed() < PSI_WINDOW);
        // The level is judged on a copy; status and events keep the raw
        // figures.
        let mut judged = self.sample;
        if self.backend.kind() == BackendKind::V2
            && self.managed.values().any(ours)
            && judged.free_pct() >= self.settings.tuning.tight_free_pct
        {
            judged.psi_some10 = 0.0;
            judged.psi_full10 = 0.0;
        }
        let before = self.tracker.level();
        let level = self.tracker.update(&judged, &self.settings.tuning, now);
        if level != before {
            let s = self.sample;
            self.event(
                EventKind::Level,
                None,
                s.free(),
                format!(
                    "{} → {level}: {:.1} % of {} free, memory PSI some {:.1} % full {:.1} %{}",
                    before,
                    s.free_pct(),
                    policy::format_bytes(s.capacity),
                    s.psi_some10,
                    s.psi_full10,
                    if s.paused {
                        ", tasks waiting for memory"
                    } else {
                        ""
                    }
                ),
            );
        }
        let views: Vec<CgroupView> = self
            .managed
            .iter()
            .filter(|(_, m)| m.present)
            .filter_map(|(k, m)| {
                let last = m.last?;
                Some(CgroupView {
                    name: k.clone(),
                    quota: m.quota,
                    usage: last.usage,
                    reclaimable: last.file + if self.swap { last.anon } else { 0 },
                    cap: m.cap,
                    reclaim_blocked: m.blocked_until_ms > now,
                })
            })
            .collect();
        let actions = policy::plan(
            PlanInput {
                level,
                host: &judged,
                tuning: &self.settings.tuning,
                now_ms: now,
                last_kill_ms: self.last_kill_ms,
            },
            &views,
        );
        for a in actions {
            self.act(a, now);
        }
        Ok(level)
    }

    fn observe_cgroups(&mut self) {
        let names: Vec<String> = self.managed.keys().cloned().collect();
        for name in names {
            let exists = self.backend.exists(&name);
            let Some(m) = self.managed.get(&name) else {
                continue;
            };
            let (was_present, quota) = (m.present, m.quota);
            if !exists {
                if was_present {
                    if let Some(m) = self.managed.get_mut(&name) {
                        m.present = false;
                        m.last = None;
                        m.cap = None;
                    }
                    self.event(
                        EventKind::Vanished,
                        Some(&name),
                        0,
                        "cgroup vanished; its quota waits for it".into(),
                    );
                }
                continue;
            }
            if !was_present {
                match self.apply(&name, &quota) {
                    Ok(()) => {
                        if let Some(m) = self.managed.get_mut(&name) {
                            m.present = true;
                        }
                        self.event(
                            EventKind::Appeared,
                            Some(&name),
                            0,
                            "cgroup appeared; quota applied".into(),
                        );
                    }
                    Err(e) => self.event(
                        EventKind::Error,
                        Some(&name),
                        0,
                        format!("applying a waiting quota: {e}"),
                    ),
                }
                continue;
            }
            let mem = match self.backend.read(&name) {
                Ok(m) => m,
                Err(e) => {
                    // Removed between the check and the read: next step.
                    if self.backend.exists(&name) {
                        self.count(&name, |c| c.errors += 1);
                        self.event(EventKind::Error, Some(&name), 0, format!("reading: {e}"));
                    }
                    continue;
                }
            };
            let Some(m) = self.managed.get_mut(&name) else {
                continue;
            };
            let prev = m.last.replace(mem);
            let kernel_kills = prev.map_or(0, |p| mem.oom_kills.saturating_sub(p.oom_kills));
            let throttled_now = m.cap.is_some()
                && (mem.paused || prev.is_some_and(|p| mem.high_events > p.high_events));
            let newly_throttled = throttled_now && !m.throttled;
            m.throttled = throttled_now;
            if throttled_now {
                m.throttled_at = Some(Instant::now());
            }
            if kernel_kills > 0 {
                m.counters.kernel_oom_kills += kernel_kills;
                self.event(
                    EventKind::KernelOomKill,
                    Some(&name),
                    mem.usage,
                    format!(
                        "the kernel OOM-killed {kernel_kills} process(es) at the cgroup's limit"
                    ),
                );
            }
            if newly_throttled {
                self.count(&name, |c| c.throttles += 1);
                self.event(
                    EventKind::Throttled,
                    Some(&name),
                    mem.usage,
                    "waiting at its cap".into(),
                );
            }
        }
    }

    fn count(&mut self, name: &str, f: impl FnOnce(&mut Counters)) {
        if let Some(m) = self.managed.get_mut(name) {
            f(&mut m.counters);
        }
    }

    fn act(&mut self, action: Action, now: u64) {
        match action {
            Action::Cap { cgroup, bytes } => {
                let Some(limit) = self.managed.get(&cgroup).map(|m| m.quota.limit_bytes()) else {
                    return;
                };
                match self.backend.set_cap(&cgroup, Some(bytes), limit) {
                    Ok(()) => {
                        if let Some(m) = self.managed.get_mut(&cgroup) {
                            m.cap = Some(bytes);
                            m.counters.caps += 1;
                        }
                        self.event(
                            EventKind::Cap,
                            Some(&cgroup),
                            bytes,
                            format!("held at {}", policy::format_bytes(bytes)),
                        );
                    }
                    Err(e) => self.failed(&cgroup, "capping", &e),
                }
            }
            Action::Reclaim { cgroup, bytes, cap } => {
                match self.backend.reclaim(&cgroup, bytes, cap) {
                    Ok(freed) => {
                        if let Some(m) = self.managed.get_mut(&cgroup) {
                            m.cap = Some(cap);
                            m.counters.reclaims += 1;
                            m.counters.reclaimed_bytes += freed;
                        }
                        self.event(
                            EventKind::Reclaim,
                            Some(&cgroup),
                            freed,
                            format!(
                                "reclaimed {} (asked {}), cap {}",
                                policy::format_bytes(freed),
                                policy::format_bytes(bytes),
                                policy::format_bytes(cap)
                            ),
                        );
                    }
                    Err(EmcError::ReclaimBlocked { freed, .. }) => {
                        let retry = self.settings.tuning.reclaim_retry_ms;
                        let usage = self.backend.read(&cgroup).map(|m| m.usage).ok();
                        if let Some(m) = self.managed.get_mut(&cgroup) {
                            m.cap = usage.or(m.cap);
                            m.blocked_until_ms = now + retry;
                            m.counters.reclaims += 1;
                            m.counters.reclaimed_bytes += freed;
                            m.counters.reclaim_blocked += 1;
                        }
                        self.event(
                            EventKind::ReclaimBlocked,
                            Some(&cgroup),
                            freed,
                            format!(
                                "reclaim found only {} of {}; skipped for {retry} ms",
                                policy::format_bytes(freed),
                                policy::format_bytes(bytes)
                            ),
                        );
                    }
                    Err(e) => self.failed(&cgroup, "reclaiming", &e),
                }
            }
            Action::Release { cgroup, cap } => {
                let Some(limit) = self.managed.get(&cgroup).map(|m| m.quota.limit_bytes()) else {
                    return;
                };
                match self.backend.set_cap(&cgroup, cap, limit) {
                    Ok(()) => {
                        if let Some(m) = self.managed.get_mut(&cgroup) {
                            m.cap = cap;
                            m.counters.releases += 1;
                        }
                        let detail = match cap {
                            Some(c) => format!("cap raised to {}", policy::format_bytes(c)),
                            None => "cap removed".into(),
                        };
                        self.event(EventKind::Release, Some(&cgroup), cap.unwrap_or(0), detail);
                    }
                    Err(e) => self.failed(&cgroup, "releasing", &e),
                }
            }
            Action::Kill { cgroup, reason } => {
                let usage = self
                    .managed
                    .get(&cgroup)
                    .and_then(|m| m.last)
                    .map_or(0, |m| m.usage);
                match self.backend.kill(&cgroup) {
                    Ok(n) => {
                        self.last_kill_ms = Some(now);
                        self.count(&cgroup, |c| c.kills += 1);
                        self.event(
                            EventKind::Kill,
                            Some(&cgroup),
                            usage,
                            format!("killed {n} process(es): {reason}"),
                        );
                    }
                    Err(e) => self.failed(&cgroup, "killing", &e),
                }
            }
        }
    }

    fn failed(&mut self, cgroup: &str, what: &str, e: &EmcError) {
        self.count(cgroup, |c| c.errors += 1);
        self.event(EventKind::Error, Some(cgroup), 0, format!("{what}: {e}"));
    }

    pub fn status(&self) -> MemStatus {
        let mut totals = Counters::default();
        let cgroups = self
            .managed
            .iter()
            .map(|(name, m)| {
                totals.add(&m.counters);
                let last = m.last.unwrap_or_default();
                let psi = last.psi.unwrap_or_default();
                let state = if !m.present {
                    "missing"
                } else if m.throttled {
                    "throttled"
                } else if m.cap.is_some() {
                    "capped"
                } else if last.usage > m.quota.guarantee.bytes() {
                    "elastic"
                } else {
                    "ok"
                };
                MemCgroupStatus {
                    name: name.clone(),
                    guarantee: m.quota.guarantee.bytes(),
                    limit: m.quota.limit_bytes(),
                    priority: m.quota.priority,
                    usage: last.usage,
                    anon: last.anon,
                    file: last.file,
                    cap: m.cap,
                    state: state.into(),
                    psi_some10: psi.some_avg10,
                    psi_full10: psi.full_avg10,
                    counters: m.counters,
                }
            })
            .collect();
        let s = self.sample;
        MemStatus {
            backend: self.backend.kind().to_string(),
            scope: self.scope_name(),
            capacity: s.capacity,
            used: s.used,
            free_pct: s.free_pct(),
            level: self.tracker.level(),
            psi_some10: s.psi_some10,
            psi_full10: s.psi_full10,
            reserve: self.settings.reserve.bytes(),
            guaranteed: self.guaranteed(),
            swap: self.swap,
            scope_oom_held: self.scope_oom_held,
            steps: self.steps,
            cgroups,
            totals,
            recent: self.events.iter().rev().take(10).rev().cloned().collect(),
        }
    }

    /// Hands the cgroups back to the kernel: caps removed (limits and
    /// guarantees stay), the scope's OOM killer restored. Quotas stay known
    /// (the desired state lives in the caller).
    pub fn stop(&mut self) {
        let names: Vec<(String, Option<u64>)> = self
            .managed
            .iter()
            .filter(|(_, m)| m.cap.is_some() && m.present)
            .map(|(k, m)| (k.clone(), m.quota.limit_bytes()))
            .collect();
        for (name, limit) in names {
            if let Err(e) = self.backend.set_cap(&name, None, limit) {
                warn!(cgroup = %name, error = %e, "removing a cap at stop");
            }
            if let Some(m) = self.managed.get_mut(&name) {
                m.cap = None;
            }
        }
        self.release_scope();
    }

    /// Directory of a managed cgroup in the memory hierarchy.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.backend.dir(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;

    const MB: u64 = 1 << 20;

    fn fixture() -> (tempfile::TempDir, Backend) {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("memory");
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(proc_root.join("pressure")).expect("mkdir");
        std::fs::write(
            proc_root.join("meminfo"),
            "MemTotal: 1048576 kB\nMemAvailable: 524288 kB\n",
        )
        .expect("w");
        let b = Backend::fixture(BackendKind::V1, &root, None, &proc_root);
        (dir, b)
    }

    fn cgroup(b: &Backend, name: &str, usage_mb: u64, file_mb: u64, limit: &str) {
        let d = b.dir(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        for (f, v) in [
            ("memory.usage_in_bytes", (usage_mb * MB).to_string()),
            ("memory.limit_in_bytes", limit.into()),
            ("memory.soft_limit_in_bytes", "-1".into()),
            (
                "memory.stat",
                format!(
                    "total_cache {}\ntotal_rss {}\ntotal_inactive_file 0\n",
                    file_mb * MB,
                    (usage_mb - file_mb) * MB
                ),
            ),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n".into(),
            ),
        ] {
            std::fs::write(d.join(f), v).expect("write");
        }
    }

    fn quota(g: u64, prio: u32) -> MemQuota {
        MemQuota {
            guarantee: Size::from_bytes(g * MB).expect("size"),
            limit: None,
            priority: prio,
        }
    }

    #[test]
    fn admission_and_missing_cgroups_are_refused_without_side_effects() {
        let (_d, b) = fixture();
        cgroup(&b, "scope", 0, 0, &(1000 * MB).to_string());
        cgroup(&b, "scope/a", 0, 0, "-1");
        let settings = EmcSettings {
            scope: Some("scope".into()),
            reserve: Size::from_bytes(100 * MB).expect("size"),
            ..Default::default()
        };
        let mut emc = Emc::with_backend(b, settings).expect("start");
        emc.set("scope/a", quota(600, 0)).expect("fits");
        let e = emc
            .set("scope/b", quota(400, 0))
            .expect_err("admission")
            .to_string();
        assert!(e.contains("does not fit"), "{e}");
        let e = emc
            .set("scope/b", quota(100, 0))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = emc
            .set("scope", quota(100, 0))
            .expect_err("scope")
            .to_string();
        assert!(e.contains("scope standing for the host"), "{e}");
        let bad = MemQuota {
            priority: 9,
            ..quota(1, 0)
        };
        assert!(
            emc.set("scope/a", bad)
                .expect_err("prio")
                .to_string()
                .contains("out of range")
        );
        // Replacing a's own quota does not count it twice.
        emc.set("scope/a", quota(900, 1)).expect("replace");
        assert_eq!(emc.guaranteed(), 900 * MB);
        assert_eq!(emc.quotas().count(), 1);
        assert!(emc.remove("scope/b").is_err());
        assert_eq!(emc.remove("scope/a").expect("remove"), quota(900, 1));
        let d = emc.dir("scope/a");
        assert_eq!(
            std::fs::read_to_string(d.join("memory.soft_limit_in_bytes")).expect("r"),
            "-1"
        );
    }

    #[test]
    fn a_tight_scope_caps_and_reclaims_and_events_say_why() {
        let (_d, b) = fixture();
        cgroup(&b, "scope", 960, 0, &(1000 * MB).to_string());
        cgroup(&b, "scope/svc", 200, 0, "-1");
        cgroup(&b, "scope/batch", 700, 500, "-1");
        let settings = EmcSettings {
            scope: Some("scope".into()),
            reserve: Size::from_bytes(MB).expect("size"),
            ..Default::default()
        };
        let mut emc = Emc::with_backend(b, settings).expect("start");
        emc.set("scope/svc", quota(300, 0)).expect("svc");
        emc.set("scope/batch", quota(100, 7)).expect("batch");
        assert_eq!(emc.step().expect("step"), Level::Critical);
        let ev = emc.events_since(0);
        let kinds: Vec<(EventKind, Option<&str>)> =
            ev.iter().map(|e| (e.kind, e.cgroup.as_deref())).collect();
        assert_eq!(kinds[0], (EventKind::Level, None));
        assert!(
            ev[0].detail.contains("normal → critical"),
            "{}",
            ev[0].detail
        );
        assert!(kinds.contains(&(EventKind::Cap, Some("scope/svc"))));
        assert!(kinds.contains(&(EventKind::Cap, Some("scope/batch"))));
        // The fixture's usage does not move, so the reclaim reads as freeing
        // nothing; what matters is whom it asked.
        assert!(
            kinds.contains(&(EventKind::Reclaim, Some("scope/batch"))),
            "{kinds:?}"
        );
        assert!(!kinds.contains(&(EventKind::Reclaim, Some("scope/svc"))));
        let batch_limit =
            std::fs::read_to_string(emc.dir("scope/batch").join("memory.limit_in_bytes"))
                .expect("r");
        assert_eq!(batch_limit, ((700 - 110) * MB).to_string());
        let st = emc.status();
        assert_eq!(st.level, Level::Critical);
        assert_eq!(st.scope, "scope");
        assert_eq!(st.cgroups.len(), 2);
        assert!(st.scope_oom_held);
        assert_eq!(
            std::fs::read_to_string(emc.dir("scope").join("memory.oom_control")).expect("r"),
            "1"
        );
        emc.stop();
        assert_eq!(
            std::fs::read_to_string(emc.dir("scope").join("memory.oom_control")).expect("r"),
            "0"
        );
        assert_eq!(
            std::fs::read_to_string(emc.dir("scope/batch").join("memory.limit_in_bytes"))
                .expect("r"),
            "-1"
        );
    }

    #[test]
    fn vanished_cgroups_wait_and_come_back() {
        let (_d, b) = fixture();
        cgroup(&b, "a", 10, 0, "-1");
        let mut emc = Emc::with_backend(b.clone(), EmcSettings::default()).expect("start");
        emc.set("a", quota(64, 0)).expect("a");
        emc.step().expect("step");
        std::fs::remove_dir_all(b.dir("a")).expect("rm");
        emc.step().expect("step");
        assert_eq!(emc.status().cgroups[0].state, "missing");
        cgroup(&b, "a", 10, 0, "-1");
        emc.step().expect("step");
        let kinds: Vec<EventKind> = emc.events_since(0).iter().map(|e| e.kind).collect();
        assert!(
            kinds.contains(&EventKind::Vanished) && kinds.contains(&EventKind::Appeared),
            "{kinds:?}"
        );
        assert_eq!(
            std::fs::read_to_string(b.dir("a").join("memory.soft_limit_in_bytes")).expect("r"),
            (64 * MB).to_string()
        );
    }
}
