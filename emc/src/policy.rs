//! The pure half of elastic memory control: quotas, admission, the host
//! level with hysteresis, and what to do at each level. No I/O; time is
//! milliseconds on a monotonic clock the caller supplies.
//!
//! Semantics:
//! - a cgroup may always grow to its guarantee; above it, it uses memory the
//!   host has spare, up to its limit;
//! - `tight`: every cgroup is capped where it stands (at least at its
//!   guarantee) and memory is reclaimed from cgroups above their guarantee,
//!   lowest priority first, largest excess next, in bounded steps, until the
//!   free share is back above the tight threshold plus the hysteresis band;
//! - `critical`: the same with twice the step;
//! - `emergency` (the host is out of memory and tasks wait, or memory is
//!   nearly gone while everything stalls): reclaim, and kill one whole cgroup
//!   above its guarantee, in the same order, at most once per cool-down;
//! - `normal`: caps are raised step by step, only as far as keeps the host
//!   out of the tight band (so a cgroup cannot flap in and out of its cap),
//!   and removed when they reach the limit.

use qos_core::Size;
use serde::{Deserialize, Serialize};

/// Priorities run from 0 (most important) to this (reclaimed first).
pub const LOWEST_PRIORITY: u32 = 7;

/// What an operator asks for one cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemQuota {
    /// Protected: never reclaimed below, never killed while within it.
    pub guarantee: Size,
    /// The most the cgroup may ever use; unlimited (the host) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Size>,
    /// 0 (most important) ..= 7.
    #[serde(default)]
    pub priority: u32,
}

impl MemQuota {
    /// Checks the quota on its own (admission is separate).
    pub fn validate(&self) -> Result<(), String> {
        if self.priority > LOWEST_PRIORITY {
            return Err(format!(
                "priority {} is out of range 0..={LOWEST_PRIORITY}",
                self.priority
            ));
        }
        if let Some(limit) = self.limit
            && limit < self.guarantee
        {
            return Err(format!(
                "limit {limit} is below the guarantee {}",
                self.guarantee
            ));
        }
        Ok(())
    }

    pub fn limit_bytes(&self) -> Option<u64> {
        self.limit.map(Size::bytes)
    }
}

/// Guarantees do not fit the memory there is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "guarantee {asked} for {cgroup} does not fit: {scope} has {capacity} of which {reserve} is \
     reserved, and other cgroups hold guarantees of {others}"
)]
pub struct AdmissionError {
    pub cgroup: String,
    pub scope: String,
    pub asked: String,
    pub capacity: String,
    pub reserve: String,
    pub others: String,
}

/// Bytes as a short human figure ("1.5GiB").
pub fn format_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (u, m) in UNITS {
        if b >= m {
            let v = b as f64 / m as f64;
            return if (v - v.round()).abs() < 0.05 {
                format!("{}{u}", v.round() as u64)
            } else {
                format!("{v:.1}{u}")
            };
        }
    }
    format!("{b}B")
}

/// Admission control: the guarantees, this one included, must fit in the
/// capacity minus the reserve.
pub fn admit(
    cgroup: &str,
    scope: &str,
    capacity: u64,
    reserve: u64,
    others: u64,
    asked: u64,
) -> Result<(), Box<AdmissionError>> {
    if others.saturating_add(asked) <= capacity.saturating_sub(reserve) {
        return Ok(());
    }
    Err(Box::new(AdmissionError {
        cgroup: cgroup.into(),
        scope: scope.into(),
        asked: format_bytes(asked),
        capacity: format_bytes(capacity),
        reserve: format_bytes(reserve),
        others: format_bytes(others),
    }))
}

/// How short of memory the host is.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Normal,
    Tight,
    Critical,
    Emergency,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Normal => "normal",
            Self::Tight => "tight",
            Self::Critical => "critical",
            Self::Emergency => "emergency",
        })
    }
}

/// Thresholds and steps. Percentages are of the scope's capacity (free
/// memory) or PSI avg10 (share of time stalled).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tuning {
    /// Tight below this share of free memory.
    pub tight_free_pct: f64,
    /// Critical below this.
    pub critical_free_pct: f64,
    /// Emergency below this while tasks stall (`psi_full_critical`).
    pub emergency_free_pct: f64,
    /// Tight when memory PSI "some" avg10 reaches this.
    pub psi_some_tight: f64,
    /// Critical when memory PSI "full" avg10 reaches this.
    pub psi_full_critical: f64,
    /// A level is left only when free memory is this many points above its
    /// threshold (and PSI below half of its), for `hold_ms`.
    pub hysteresis_pct: f64,
    pub hold_ms: u64,
    /// Most reclaimed from one cgroup in one step (twice this when critical).
    pub reclaim_step: Size,
    /// Most a cap is raised in one step when the host is normal.
    pub release_step: Size,
    /// Least time between two kills.
    pub kill_cooldown_ms: u64,
    /// A cgroup whose reclaim failed (nothing reclaimable) is skipped this
    /// long.
    pub reclaim_retry_ms: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            tight_free_pct: 10.0,
            critical_free_pct: 5.0,
            emergency_free_pct: 2.0,
            psi_some_tight: 20.0,
            psi_full_critical: 20.0,
            hysteresis_pct: 5.0,
            hold_ms: 2_000,
            reclaim_step: Size::clamped(64 << 20),
            release_step: Size::clamped(32 << 20),
            kill_cooldown_ms: 2_000,
            reclaim_retry_ms: 1_000,
        }
    }
}

impl Tuning {
    pub fn validate(&self) -> Result<(), String> {
        let pct = [
            ("tight_free_pct", self.tight_free_pct),
            ("critical_free_pct", self.critical_free_pct),
            ("emergency_free_pct", self.emergency_free_pct),
            ("psi_some_tight", self.psi_some_tight),
            ("psi_full_critical", self.psi_full_critical),
            ("hysteresis_pct", self.hysteresis_pct),
        ];
        for (k, v) in pct {
            if !(0.0..=100.0).contains(&v) || v.is_nan() {
                return Err(format!("{k} = {v} is not a percentage (0..=100)"));
            }
        }
        if !(self.emergency_free_pct <= self.critical_free_pct
            && self.critical_free_pct <= self.tight_free_pct)
        {
            return Err(format!(
                "thresholds must satisfy emergency_free_pct ({}) <= critical_free_pct ({}) <= \
                 tight_free_pct ({})",
                self.emergency_free_pct, self.critical_free_pct, self.tight_free_pct
            ));
        }
        if self.tight_free_pct + self.hysteresis_pct > 100.0 {
            return Err("tight_free_pct + hysteresis_pct exceeds 100".into());
        }
        Ok(())
    }
}

/// One reading of the scope (the host, or the cgroup standing for it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostSample {
    pub capacity: u64,
    /// Memory in use that reclaim cannot simply drop (working set).
    pub used: u64,
    pub psi_some10: f64,
    pub psi_full10: f64,
    /// Tasks wait for memory the kernel could not find (out of memory with
    /// the OOM killer held back).
    pub paused: bool,
}

impl HostSample {
    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used)
    }

    pub fn free_pct(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        self.free() as f64 * 100.0 / self.capacity as f64
    }

    fn bytes_of_pct(&self, pct: f64) -> u64 {
        (self.capacity as f64 * pct / 100.0) as u64
    }
}

/// The level a sample stands for. With `leaving`, the thresholds are those a
/// level must clear to be left: free memory `hysteresis_pct` points higher,
/// PSI below half of its threshold.
pub fn classify(s: &HostSample, t: &Tuning, leaving: bool) -> Level {
    let (margin, psi_scale) = if leaving {
        (t.hysteresis_pct, 0.5)
    } else {
        (0.0, 1.0)
    };
    let free = s.free_pct();
    let stalled = s.psi_full10 >= t.psi_full_critical * psi_scale;
    if s.paused || (free < t.emergency_free_pct + margin && stalled) {
        Level::Emergency
    } else if free < t.critical_free_pct + margin || stalled {
        Level::Critical
    } else if free < t.tight_free_pct + margin || s.psi_some10 >= t.psi_some_tight * psi_scale {
        Level::Tight
    } else {
        Level::Normal
    }
}

/// The host level with hysteresis: it rises at once and falls only after
/// the lower level has held, with margin, for `hold_ms`.
#[derive(Clone, Debug, Default)]
pub struct LevelTracker {
    level: Level,
    lower_since_ms: Option<u64>,
}

impl LevelTracker {
    pub fn level(&self) -> Level {
        self.level
    }

    pub fn update(&mut self, s: &HostSample, t: &Tuning, now_ms: u64) -> Level {
        let raw = classify(s, t, false);
        if raw >= self.level {
            self.lower_since_ms = None;
            self.level = raw;
            return self.level;
        }
        let settled = classify(s, t, true);
        if settled < self.level {
            let since = *self.lower_since_ms.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= t.hold_ms {
                self.level = settled;
                self.lower_since_ms = None;
            }
        } else {
            self.lower_since_ms = None;
        }
        self.level
    }
}

/// One managed cgroup as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct CgroupView {
    pub name: String,
    pub quota: MemQuota,
    pub usage: u64,
    /// What reclaim can take (file pages; anonymous memory too with swap).
    pub reclaimable: u64,
    /// The cap in force, if any.
    pub cap: Option<u64>,
    /// A recent reclaim found nothing to take.
    pub reclaim_blocked: bool,
}

impl CgroupView {
    pub fn excess(&self) -> u64 {
        self.usage.saturating_sub(self.quota.guarantee.bytes())
    }

    /// The cap that stops regrowth: where it stands, at least its guarantee.
    fn hold_cap(&self) -> u64 {
        self.usage.max(self.quota.guarantee.bytes())
    }
}

/// What the controller does to one cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Hold the cgroup at `bytes`: it may not grow past it.
    Cap { cgroup: String, bytes: u64 },
    /// Take `bytes` back; the cap follows down to `cap`.
    Reclaim {
        cgroup: String,
        bytes: u64,
        cap: u64,
    },
    /// Raise the cap to `cap`; `None` removes it (back to the limit).
    Release { cgroup: String, cap: Option<u64> },
    /// Kill every process of the cgroup.
    Kill { cgroup: String, reason: String },
}

/// Reclaim (and kill) order: cgroups above their guarantee, lowest priority
/// first, largest excess next, then by name for determinism.
pub fn reclaim_order(views: &[CgroupView]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..views.len())
        .filter(|&i| views[i].excess() > 0)
        .collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (&views[a], &views[b]);
        y.quota
            .priority
            .cmp(&x.quota.priority)
            .then(y.excess().cmp(&x.excess()))
            .then(x.name.cmp(&y.name))
    });
    idx
}

/// Everything the planner needs besides the cgroups.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    pub level: Level,
    pub host: &'a HostSample,
    pub tuning: &'a Tuning,
    pub now_ms: u64,
    /// When the last kill happened.
    pub last_kill_ms: Option<u64>,
}

/// The actions of one control step.
pub fn plan(input: PlanInput<'_>, views: &[CgroupView]) -> Vec<Action> {
    let PlanInput {
        level,
        host,
        tuning: t,
        now_ms,
        last_kill_ms,
    } = input;
    let mut actions = Vec::new();
    if level == Level::Normal {
        release(host, t, views, &mut actions);
        return actions;
    }
    // Stop regrowth.
    for v in views {
        let hold = v.hold_cap();
        // A cap already close above the usage holds well enough; moving it
        // down by a few pages every step would only be noise.
        let slack = t.release_step.bytes();
        if v.cap.is_none_or(|c| c > hold.saturating_add(slack))
            && v.quota.limit_bytes().is_none_or(|l| hold < l)
        {
            actions.push(Action::Cap {
                cgroup: v.name.clone(),
                bytes: hold,
            });
        }
    }
    // Reclaim towards the top of the hysteresis band.
    let target_free = host.bytes_of_pct(t.tight_free_pct + t.hysteresis_pct);
    let mut need = target_free.saturating_sub(host.free());
    let step = match level {
        Level::Tight => t.reclaim_step.bytes(),
        _ => t.reclaim_step.bytes().saturating_mul(2),
    };
    let order = reclaim_order(views);
    for &i in &order {
        if need == 0 {
            break;
        }
        let v = &views[i];
        if v.reclaim_blocked {
            continue;
        }
        let bytes = v.excess().min(v.reclaimable).min(step).min(need);
        if bytes == 0 {
            continue;
        }
        need -= bytes;
        actions.push(Action::Reclaim {
            cgroup: v.name.clone(),
            bytes,
            cap: v.usage - bytes,
        });
    }
    // A kill cannot be undone: the held level is not enough, the sample in
    // hand must be an emergency too (after a kill the level stays up for
    // the hold while the victim's memory comes back; with a cgroup.kill
    // that frees it asynchronously, that outlasts the cool-down).
    if level == Level::Emergency
        && classify(host, t, false) == Level::Emergency
        && last_kill_ms.is_none_or(|k| now_ms.saturating_sub(k) >= t.kill_cooldown_ms)
        && let Some(&victim) = order.first()
    {
        let v = &views[victim];
        actions.push(Action::Kill {
            cgroup: v.name.clone(),
            reason: format!(
                "host in emergency ({:.1} % free{}); {} is the lowest priority ({}) above its \
                 guarantee with the largest excess ({})",
                host.free_pct(),
                if host.paused {
                    ", tasks waiting for memory"
                } else {
                    ""
                },
                v.name,
                v.quota.priority,
                format_bytes(v.excess())
            ),
        });
    }
    actions
}

/// Normal host: raise caps, most important cgroups first, only as far as
/// keeps free memory above the tight band.
fn release(host: &HostSample, t: &Tuning, views: &[CgroupView], actions: &mut Vec<Action>) {
    let band = host.bytes_of_pct(t.tight_free_pct + t.hysteresis_pct);
    let mut room = host.free().saturating_sub(band);
    let mut capped: Vec<&CgroupView> = views.iter().filter(|v| v.cap.is_some()).collect();
    capped.sort_by(|a, b| {
        a.quota
            .priority
            .cmp(&b.quota.priority)
            .then(a.name.cmp(&b.name))
    });
    for v in capped {
        let Some(cap) = v.cap else { continue };
        let ceiling = v.quota.limit_bytes().unwrap_or(host.capacity);
        // Headroom the cgroup already has under its cap counts against the room.
        let headroom = cap.saturating_sub(v.usage);
        let room_here = room.saturating_sub(headroom);
        let raise = room_here.min(t.release_step.bytes());
        let next = cap.saturating_add(raise);
        if next >= ceiling {
            actions.push(Action::Release {
                cgroup: v.name.clone(),
                cap: None,
            });
        } else if raise > 0 {
            actions.push(Action::Release {
                cgroup: v.name.clone(),
                cap: Some(next),
            });
        }
        room = room.saturating_sub(headroom + raise);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn size(mb: u64) -> Size {
        Size::from_bytes(mb * MB).expect("size")
    }

    fn host(capacity_mb: u64, used_mb: u64) -> HostSample {
        HostSample {
            capacity: capacity_mb * MB,
            used: used_mb * MB,
            ..Default::default()
        }
    }

    fn view(name: &str, g: u64, prio: u32, usage: u64, file: u64) -> CgroupView {
        CgroupView {
            name: name.into(),
            quota: MemQuota {
                guarantee: size(g),
                limit: None,
                priority: prio,
            },
            usage: usage * MB,
            reclaimable: file * MB,
            cap: None,
            reclaim_blocked: false,
        }
    }

    #[test]
    fn quotas_are_validated() {
        let ok = MemQuota {
            guarantee: size(100),
            limit: Some(size(200)),
            priority: 7,
        };
        assert_eq!(ok.validate(), Ok(()));
        let low = MemQuota {
            limit: Some(size(50)),
            ..ok
        };
        assert!(
            low.validate()
                .expect_err("limit")
                .contains("below the guarantee")
        );
        let prio = MemQuota { priority: 8, ..ok };
        assert!(prio.validate().expect_err("prio").contains("out of range"));
    }

    #[test]
    fn admission_counts_the_reserve_and_the_others() {
        assert!(admit("a", "host", 1000 * MB, 100 * MB, 500 * MB, 400 * MB).is_ok());
        let e = admit("a", "host", 1000 * MB, 100 * MB, 500 * MB, 401 * MB)
            .expect_err("over")
            .to_string();
        assert!(e.contains("guarantee 401MiB for a"), "{e}");
        assert!(e.contains("100MiB is reserved"), "{e}");
        assert!(e.contains("500MiB"), "{e}");
        // A reserve larger than the host admits nothing.
        assert!(admit("a", "host", 10 * MB, 20 * MB, 0, 1).is_err());
    }

    #[test]
    fn levels_from_free_memory_and_psi() {
        let t = Tuning::default();
        let table: &[(u64, f64, f64, bool, Level)] = &[
            // used of 1000, psi some, psi full, paused → level
            (500, 0.0, 0.0, false, Level::Normal),
            (899, 0.0, 0.0, false, Level::Normal),
            (901, 0.0, 0.0, false, Level::Tight),
            (500, 25.0, 0.0, false, Level::Tight),
            (951, 0.0, 0.0, false, Level::Critical),
            (500, 0.0, 30.0, false, Level::Critical),
            (990, 0.0, 0.0, false, Level::Critical),
            (990, 0.0, 30.0, false, Level::Emergency),
            (100, 0.0, 0.0, true, Level::Emergency),
        ];
        for &(used, some, full, paused, want) in table {
            let s = HostSample {
                psi_some10: some,
                psi_full10: full,
                paused,
                ..host(1000, used)
            };
            assert_eq!(classify(&s, &t, false), want, "{s:?}");
        }
        // Leaving needs the margin: 86 % used is normal on the way up but
        // still tight on the way down.
        assert_eq!(classify(&host(1000, 860), &t, false), Level::Normal);
        assert_eq!(classify(&host(1000, 860), &t, true), Level::Tight);
        assert_eq!(classify(&host(0, 0), &t, false), Level::Critical);
    }

    #[test]
    fn the_level_rises_at_once_and_falls_after_the_hold() {
        let t = Tuning::default();
        let mut lt = LevelTracker::default();
        assert_eq!(lt.update(&host(1000, 960), &t, 0), Level::Critical);
        // Back to 86 % used: critical is left after the hold (free clears
        // 5 + 5 %), tight is not (free is below 10 + 5 %).
        assert_eq!(lt.update(&host(1000, 860), &t, 100), Level::Critical);
        assert_eq!(lt.update(&host(1000, 860), &t, 1_500), Level::Critical);
        assert_eq!(lt.update(&host(1000, 860), &t, 2_100), Level::Tight);
        // Tight is not left while used stays in the band.
        assert_eq!(lt.update(&host(1000, 860), &t, 10_000), Level::Tight);
        // Leaving tight needs 2 s below 85 % without a relapse.
        assert_eq!(lt.update(&host(1000, 800), &t, 11_000), Level::Tight);
        assert_eq!(lt.update(&host(1000, 860), &t, 12_000), Level::Tight);
        assert_eq!(lt.update(&host(1000, 800), &t, 12_500), Level::Tight);
        assert_eq!(lt.update(&host(1000, 800), &t, 14_000), Level::Tight);
        assert_eq!(lt.update(&host(1000, 800), &t, 14_500), Level::Normal);
        // A spike goes straight to emergency.
        let paused = HostSample {
            paused: true,
            ..host(1000, 999)
        };
        assert_eq!(lt.update(&paused, &t, 15_000), Level::Emergency);
    }

    #[test]
    fn oscillating_load_inside_the_band_does_not_flap() {
        let t = Tuning::default();
        let mut lt = LevelTracker::default();
        let mut changes = 0;
        let mut last = lt.level();
        // Used swings between 87 % and 92 % every 300 ms for a minute.
        for step in 0..200u64 {
            let used = if step % 2 == 0 { 870 } else { 920 };
            let l = lt.update(&host(1000, used), &t, step * 300);
            if l != last {
                changes += 1;
                last = l;
            }
        }
        assert_eq!(changes, 1, "one rise to tight, no fall while in the band");
    }

    #[test]
    fn order_is_priority_then_excess_then_name() {
        let views = vec![
            view("a", 100, 1, 400, 0), // excess 300, prio 1
            view("b", 100, 5, 300, 0), // excess 200, prio 5
            view("c", 100, 5, 500, 0), // excess 400, prio 5
            view("d", 100, 7, 90, 0),  // below guarantee: never
            view("e", 100, 5, 300, 0), // ties b: by name
        ];
        let order: Vec<&str> = reclaim_order(&views)
            .into_iter()
            .map(|i| views[i].name.as_str())
            .collect();
        assert_eq!(order, ["c", "b", "e", "a"]);
    }

    fn input<'a>(level: Level, h: &'a HostSample, t: &'a Tuning) -> PlanInput<'a> {
        PlanInput {
            level,
            host: h,
            tuning: t,
            now_ms: 10_000,
            last_kill_ms: None,
        }
    }

    #[test]
    fn tight_caps_everyone_and_reclaims_in_order_in_bounded_steps() {
        let t = Tuning::default();
        let h = host(1000, 1000); // nothing free: 150 MiB needed to reach 15 %
        let views = vec![
            view("svc", 300, 0, 200, 50), // below guarantee
            view("low", 100, 7, 400, 300),
            view("mid", 100, 3, 300, 300),
        ];
        let a = plan(input(Level::Tight, &h, &t), &views);
        assert_eq!(
            a,
            vec![
                Action::Cap {
                    cgroup: "svc".into(),
                    bytes: 300 * MB
                },
                Action::Cap {
                    cgroup: "low".into(),
                    bytes: 400 * MB
                },
                Action::Cap {
                    cgroup: "mid".into(),
                    bytes: 300 * MB
                },
                Action::Reclaim {
                    cgroup: "low".into(),
                    bytes: 64 * MB,
                    cap: 336 * MB
                },
                Action::Reclaim {
                    cgroup: "mid".into(),
                    bytes: 64 * MB,
                    cap: 236 * MB
                },
            ]
        );
        // Critical doubles the step; the need (150) bounds the total.
        let a = plan(input(Level::Critical, &h, &t), &views);
        let reclaimed: Vec<(String, u64)> = a
            .iter()
            .filter_map(|x| match x {
                Action::Reclaim { cgroup, bytes, .. } => Some((cgroup.clone(), bytes / MB)),
                _ => None,
            })
            .collect();
        assert_eq!(reclaimed, [("low".into(), 128), ("mid".into(), 22)]);
    }

    #[test]
    fn reclaim_never_goes_below_the_guarantee_or_past_what_is_reclaimable() {
        let t = Tuning::default();
        let h = host(1000, 990);
        let views = vec![
            view("a", 380, 7, 400, 300), // excess 20
            view("b", 100, 6, 400, 10),  // only 10 reclaimable
            CgroupView {
                reclaim_blocked: true,
                ..view("c", 100, 5, 400, 300)
            },
            view("d", 100, 4, 400, 300),
        ];
        let a = plan(input(Level::Tight, &h, &t), &views);
        let reclaims: Vec<&Action> = a
            .iter()
            .filter(|x| matches!(x, Action::Reclaim { .. }))
            .collect();
        assert_eq!(
            reclaims,
            [
                &Action::Reclaim {
                    cgroup: "a".into(),
                    bytes: 20 * MB,
                    cap: 380 * MB
                },
                &Action::Reclaim {
                    cgroup: "b".into(),
                    bytes: 10 * MB,
                    cap: 390 * MB
                },
                &Action::Reclaim {
                    cgroup: "d".into(),
                    bytes: 64 * MB,
                    cap: 336 * MB
                },
            ]
        );
        for x in &a {
            if let Action::Reclaim { cgroup, cap, .. } = x {
                let v = views.iter().find(|v| &v.name == cgroup).expect("view");
                assert!(*cap >= v.quota.guarantee.bytes());
            }
        }
    }

    #[test]
    fn caps_are_not_repeated_or_raised_and_stop_at_the_limit() {
        let t = Tuning::default();
        let h = host(1000, 920);
        let capped = CgroupView {
            cap: Some(400 * MB),
            ..view("a", 100, 7, 340, 0)
        };
        let close = CgroupView {
            cap: Some(350 * MB),
            ..view("c", 100, 7, 340, 0)
        };
        let at_limit = CgroupView {
            quota: MemQuota {
                guarantee: size(100),
                limit: Some(size(200)),
                priority: 7,
            },
            ..view("b", 100, 7, 200, 0)
        };
        let a = plan(input(Level::Tight, &h, &t), &[capped, at_limit, close]);
        assert_eq!(
            a,
            vec![Action::Cap {
                cgroup: "a".into(),
                bytes: 340 * MB
            }]
        );
    }

    #[test]
    fn kills_only_in_emergency_by_order_with_a_cooldown() {
        let t = Tuning::default();
        let h = HostSample {
            paused: true,
            ..host(1000, 1000)
        };
        let views = vec![
            view("svc", 400, 0, 300, 0),
            view("a", 100, 2, 400, 0),
            view("b", 100, 6, 200, 0),
        ];
        for level in [Level::Normal, Level::Tight, Level::Critical] {
            let a = plan(input(level, &h, &t), &views);
            assert!(
                !a.iter().any(|x| matches!(x, Action::Kill { .. })),
                "{level}: {a:?}"
            );
        }
        let a = plan(input(Level::Emergency, &h, &t), &views);
        let kills: Vec<&Action> = a
            .iter()
            .filter(|x| matches!(x, Action::Kill { .. }))
            .collect();
        assert_eq!(kills.len(), 1);
        let Action::Kill { cgroup, reason } = kills[0] else {
            unreachable!()
        };
        assert_eq!(cgroup, "b");
        assert!(reason.contains("lowest priority (6)"), "{reason}");
        assert!(reason.contains("tasks waiting"), "{reason}");
        // Within the cool-down: no second kill.
        let mut i = input(Level::Emergency, &h, &t);
        i.last_kill_ms = Some(9_000);
        assert!(
            !plan(i, &views)
                .iter()
                .any(|x| matches!(x, Action::Kill { .. }))
        );
        i.last_kill_ms = Some(8_000);
        assert!(
            plan(i, &views)
                .iter()
                .any(|x| matches!(x, Action::Kill { .. }))
        );
        // The level is still held at emergency, but the host has memory
        // again (the last victim's came back): no second kill.
        let recovered = host(1000, 500);
        assert!(
            !plan(input(Level::Emergency, &recovered, &t), &views)
                .iter()
                .any(|x| matches!(x, Action::Kill { .. }))
        );
        // Nobody above guarantee: nobody is killed.
        let within = vec![view("svc", 400, 0, 300, 0)];
        assert!(
            !plan(input(Level::Emergency, &h, &t), &within)
                .iter()
                .any(|x| matches!(x, Action::Kill { .. }))
        );
    }

    #[test]
    fn normal_releases_caps_step_by_step_within_the_room() {
        let t = Tuning::default();
        // 1000 MiB, 600 used: room above the 15 % band = 250 MiB.
        let h = host(1000, 600);
        let views = vec![
            CgroupView {
                cap: Some(300 * MB),
                ..view("hi", 100, 0, 300, 0)
            },
            CgroupView {
                cap: Some(300 * MB),
                ..view("lo", 100, 7, 300, 0)
            },
            CgroupView {
                cap: Some(150 * MB),
                quota: MemQuota {
                    guarantee: size(100),
                    limit: Some(size(160)),
                    priority: 7,
                },
                ..view("lim", 100, 7, 150, 0)
            },
        ];
        let a = plan(input(Level::Normal, &h, &t), &views);
        assert_eq!(
            a,
            vec![
                Action::Release {
                    cgroup: "hi".into(),
                    cap: Some(332 * MB)
                },
                Action::Release {
                    cgroup: "lim".into(),
                    cap: None
                },
                Action::Release {
                    cgroup: "lo".into(),
                    cap: Some(332 * MB)
                },
            ]
        );
        // No room: caps stay.
        let full = host(1000, 860);
        assert!(plan(input(Level::Normal, &full, &t), &views[..2]).is_empty());
        // A cap with unused headroom is not raised further.
        let idle = [CgroupView {
            cap: Some(700 * MB),
            ..view("idle", 100, 7, 300, 0)
        }];
        assert!(plan(input(Level::Normal, &h, &t), &idle).is_empty());
    }

    #[test]
    fn tuning_is_validated() {
        assert_eq!(Tuning::default().validate(), Ok(()));
        let bad = Tuning {
            critical_free_pct: 20.0,
            ..Tuning::default()
        };
        assert!(bad.validate().expect_err("order").contains("<="));
        let bad = Tuning {
            psi_some_tight: 120.0,
            ..Tuning::default()
        };
        assert!(bad.validate().expect_err("pct").contains("psi_some_tight"));
    }

    #[test]
    fn bytes_format_shortly() {
        assert_eq!(format_bytes(512), "512B");
        assert_eq!(format_bytes(64 * MB), "64MiB");
        assert_eq!(format_bytes(1536 * MB), "1.5GiB");
    }
}
