//! IO policy maths: limits and their validation, weights turned into rates,
//! the device capacity estimate, and the per-group enforcement state machine
//! (backpressure and debt) used where the kernel cannot attribute writeback.
//! Pure: no I/O, no clock.

use std::{fmt, str::FromStr};

use qos_core::units::Size;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid byte rate '{input}': {reason}")]
    Rate { input: String, reason: String },
    #[error("weight {0} is outside 1..=1000")]
    Weight(u32),
    #[error("{what} must be between 1 and {max}, got {value}")]
    Iops {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error(
        "no limit given: set at least one of write_bps, read_bps, write_iops, read_iops, weight"
    )]
    Empty,
}

/// Bytes per second ("20MiB", "20M/s", "512KiB/s", "1048576"; binary units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteRate(u64);

impl ByteRate {
    pub fn from_bytes_per_sec(bps: u64) -> Result<Self, PolicyError> {
        Size::from_bytes(bps)
            .map(|s| Self(s.bytes()))
            .map_err(|e| PolicyError::Rate {
                input: bps.to_string(),
                reason: e.to_string(),
            })
    }

    /// `bps` clamped into the accepted range (as [`Size::clamped`]): for
    /// defaults that cannot be refused.
    pub const fn clamped(bps: u64) -> Self {
        Self(Size::clamped(bps).bytes())
    }

    pub const fn bytes_per_sec(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteRate {
    type Err = PolicyError;

    fn from_str(input: &str) -> Result<Self, PolicyError> {
        let s = input.trim();
        let s = s
            .strip_suffix("/s")
            .or_else(|| s.strip_suffix("ps"))
            .unwrap_or(s);
        s.parse::<Size>()
            .map(|size| Self(size.bytes()))
            .map_err(|e| PolicyError::Rate {
                input: input.into(),
                reason: e.to_string(),
            })
    }
}

impl fmt::Display for ByteRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", Size::clamped(self.0))
    }
}

impl Serialize for ByteRate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&Size::clamped(self.0))
    }
}

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Self::from_bytes_per_sec(n),
            Raw::Text(t) => t.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// Largest accepted iops limit.
pub const MAX_IOPS: u64 = 100_000_000;
pub const MIN_WEIGHT: u32 = 1;
pub const MAX_WEIGHT: u32 = 1000;

/// One cgroup's limits on one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bps: Option<ByteRate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bps: Option<ByteRate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<u64>,
    /// Share of the device among busy cgroups, 1..=1000 (as blkio/BFQ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl IoLimits {
    pub fn validate(&self) -> Result<(), PolicyError> {
        if *self == Self::default() {
            return Err(PolicyError::Empty);
        }
        if let Some(w) = self.weight
            && !(MIN_WEIGHT..=MAX_WEIGHT).contains(&w)
        {
            return Err(PolicyError::Weight(w));
        }
        for (what, v) in [
            ("write_iops", self.write_iops),
            ("read_iops", self.read_iops),
        ] {
            if let Some(value) = v
                && !(1..=MAX_IOPS).contains(&value)
            {
                return Err(PolicyError::Iops {
                    what,
                    value,
                    max: MAX_IOPS,
                });
            }
        }
        Ok(())
    }
}

/// Splits `capacity` among busy groups in proportion to their weights.
/// Idle groups get nothing (their share flows to the busy ones).
pub fn weight_shares(capacity: u64, weights: &[(u32, bool)]) -> Vec<u64> {
    let total: u64 = weights
        .iter()
        .filter(|(_, busy)| *busy)
        .map(|(w, _)| *w as u64)
        .sum();
    weights
        .iter()
        .map(|&(w, busy)| {
            if !busy || total == 0 {
                0
            } else {
                ((capacity as u128 * w as u128) / total as u128) as u64
            }
        })
        .collect()
}

/// Estimate of what a device can write per second, for weights turned into
/// rates. Judged over windows of `CAPACITY_WINDOW_S` (per-step deliveries
/// are lumpy, and every rate rewrite restarts blk-throttle's slice): while
/// the busy groups use what they are given, grow fourfold per second until
/// the device first proves the limit (slow start), then probe up
/// `CAPACITY_PROBE` per second; when they get a little less, follow what
/// was delivered; when they get clearly less, fall towards it (at most by
/// half per window): at once when slow start overshoots, otherwise after
/// two windows in a row (one may be a stall).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CapacityEstimate {
    bps: f64,
    floor: f64,
    slow_start: bool,
    /// The last window was backlogged and got clearly less than the
    /// estimate (one such window alone may be a stall, not the device).
    short_before: bool,
    /// It has grown at least once.
    grown: bool,
    /// The window being measured: seconds, bytes delivered, seconds in
    /// which the groups had more to write, bytes their rates allowed.
    window_s: f64,
    window_bytes: f64,
    window_backlogged_s: f64,
    window_allowed_bytes: f64,
}

/// Probe step per second once the device has shown its limit.
pub const CAPACITY_PROBE: f64 = 0.05;
/// Seconds of delivery judged at once.
pub const CAPACITY_WINDOW_S: f64 = 0.5;

impl CapacityEstimate {
    pub fn new(initial_bps: u64, floor_bps: u64) -> Self {
        Self {
            bps: initial_bps.max(floor_bps) as f64,
            floor: floor_bps as f64,
            slow_start: true,
            short_before: false,
            grown: false,
            window_s: 0.0,
            window_bytes: 0.0,
            window_backlogged_s: 0.0,
            window_allowed_bytes: 0.0,
        }
    }

    pub fn bps(&self) -> u64 {
        self.bps as u64
    }

    /// `delivered_bps`: what the busy groups wrote over `dt_s` seconds;
    /// `allowed_bps`: the sum of their rates; `backlogged`: they all had
    /// more to write. Returns true when the estimate moved.
    pub fn update(
        &mut self,
        delivered_bps: f64,
        allowed_bps: f64,
        backlogged: bool,
        dt_s: f64,
    ) -> bool {
        if dt_s <= 0.0 || !delivered_bps.is_finite() || !allowed_bps.is_finite() {
            return false;
        }
        self.window_s += dt_s;
        self.window_bytes += delivered_bps.max(0.0) * dt_s;
        self.window_allowed_bytes += allowed_bps.max(0.0) * dt_s;
        if backlogged {
            self.window_backlogged_s += dt_s;
        }
        if self.window_s < CAPACITY_WINDOW_S {
            return false;
        }
        let seconds = self.window_s;
        let delivered = self.window_bytes / seconds;
        // Per step, backlog signals are noisy (writes come in lumps);
        // three quarters of the window will do. Whether the groups used
        // what they were allowed is judged on the window's totals.
        let backlogged = self.window_backlogged_s >= 0.75 * seconds;
        let saturated = self.window_allowed_bytes > 0.0
            && self.window_bytes >= 0.95 * self.window_allowed_bytes;
        (
            self.window_s,
            self.window_bytes,
            self.window_backlogged_s,
            self.window_allowed_bytes,
        ) = (0.0, 0.0, 0.0, 0.0);
        let before = self.bps;
        // Device-bound: the groups had more to write and did not get it.
        let bound = backlogged && !saturated && delivered < self.bps;
        let short = bound && delivered < 0.8 * self.bps;
        if saturated && delivered >= 0.85 * self.bps {
            let per_second: f64 = if self.slow_start {
                4.0
            } else {
                1.0 + CAPACITY_PROBE
            };
            self.bps *= per_second.powf(seconds.min(1.0));
            self.grown = true;
        } else if short && (self.short_before || (self.slow_start && self.grown)) {
            // The groups had more to write and could not: the device (or
            // the flushing) is the limit. Fall towards what it delivered,
            // at most by half per window. The first short window after
            // slow start has grown is the device (its overshoot is costly);
            // a short window before that may be the first flush stalling,
            // and then slow start goes on.
            self.slow_start &= !self.grown;
            self.bps = (delivered * 1.02).max(self.bps / 2.0);
        } else if bound && !short && self.grown {
            // A little short: the device is full. Step just below what it
            // delivered, so that every group is held by its own rate; at
            // the device's limit the groups with small shares keep theirs
            // and the large ones lose.
            self.slow_start = false;
            self.bps = delivered * 0.97;
        }
        // Light groups teach nothing about the device.
        self.short_before = short;
        self.bps = self.bps.max(self.floor);
        self.bps != before
    }
}

/// Dirty backlog above which a group's writers are paused, and below which
/// they resume: a quarter second of its rate, at least 8 MiB.
pub fn watermarks(rate_bps: Option<u64>) -> (u64, u64) {
    const MIN_HIGH: u64 = 8 << 20;
    let high = rate_bps.map_or(4 * MIN_HIGH, |r| (r / 4).max(MIN_HIGH));
    (high, high / 2)
}

/// How much of a file the flush helper writes per call: an eighth of a
/// second of the group's rate, 1 to 16 MiB, whole MiB. blk-throttle holds a
/// bio whole until the group's budget covers it, and a filesystem builds
/// writeback bios as large as the range allows (xfs: hundreds of MiB), so
/// unbounded flushes move in lumps of many seconds.
pub fn flush_chunk(rate_bps: Option<u64>) -> u64 {
    const MIB: u64 = 1 << 20;
    rate_bps.map_or(16 * MIB, |r| (r / 8).clamp(MIB, 16 * MIB) / MIB * MIB)
}

/// Enforcement state of a group on a host where the kernel cannot attribute
/// writeback (v1 blkio).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforce {
    /// Writers run; the flush helper writes their dirty pages, throttled.
    #[default]
    Running,
    /// Backlog too large: writers paused while the helper catches up.
    Paused,
    /// The kernel flusher wrote some of the group's pages unthrottled:
    /// writers and helper wait until that debt is repaid at the group's rate.
    Repaying,
}

impl Enforce {
    /// As serialised: `running`, `paused`, `repaying`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Repaying => "repaying",
        }
    }

    pub fn writers_paused(self) -> bool {
        self != Self::Running
    }

    pub fn flush_allowed(self) -> bool {
        self != Self::Repaying
    }
}

/// Debt after a step: grows by the bytes the kernel wrote for the group
/// uncharged, shrinks at the group's rate while it repays.
pub fn next_debt(debt: u64, leaked: u64, rate_bps: Option<u64>, repaying: bool, dt_s: f64) -> u64 {
    let repaid = match (repaying, rate_bps) {
        (true, Some(r)) => (r as f64 * dt_s.max(0.0)) as u64,
        // No byte rate to repay at: forgive (nothing to hold it against).
        (_, None) => u64::MAX,
        (false, Some(_)) => 0,
    };
    debt.saturating_add(leaked).saturating_sub(repaid)
}

/// Next state from the backlog and the debt, with hysteresis on the backlog.
pub fn next_enforce(state: Enforce, pending: u64, debt: u64, (high, low): (u64, u64)) -> Enforce {
    if debt > 0 {
        return Enforce::Repaying;
    }
    match state {
        Enforce::Running if pending > high => Enforce::Paused,
        Enforce::Running => Enforce::Running,
        Enforce::Paused | Enforce::Repaying if pending > low => Enforce::Paused,
        Enforce::Paused | Enforce::Repaying => Enforce::Running,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn flush_chunk_is_an_eighth_second_within_bounds() {
        const MIB: u64 = 1 << 20;
        assert_eq!(flush_chunk(None), 16 * MIB);
        assert_eq!(flush_chunk(Some(1)), MIB);
        assert_eq!(flush_chunk(Some(5 * MIB)), MIB);
        assert_eq!(flush_chunk(Some(40 * MIB)), 5 * MIB);
        assert_eq!(flush_chunk(Some(41 * MIB)), 5 * MIB);
        assert_eq!(flush_chunk(Some(u64::MAX)), 16 * MIB);
        for r in (0..1000).map(|i| i * 997 * 1024) {
            let c = flush_chunk(Some(r));
            assert!(
                c.is_multiple_of(MIB) && (MIB..=16 * MIB).contains(&c),
                "{r}: {c}"
            );
        }
    }

    #[test]
    fn byte_rates_parse_with_and_without_per_second() {
        for (s, v) in [
            ("20MiB", 20 << 20),
            ("20M/s", 20 << 20),
            ("512KiB/s", 512 << 10),
            ("1048576", 1 << 20),
            ("1G", 1 << 30),
            (" 3mbps", 3 << 20),
        ] {
            assert_eq!(s.parse::<ByteRate>().unwrap().bytes_per_sec(), v, "{s}");
        }
        for bad in ["", "0", "-1M", "ten", "5furlongs", "2P/s"] {
            let e = bad.parse::<ByteRate>().unwrap_err();
            assert!(e.to_string().contains(bad.trim()), "{bad}: {e}");
        }
        let r: ByteRate = "10MiB".parse().unwrap();
        assert_eq!(r.to_string(), "10MiB/s");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"10MiB\"");
        assert_eq!(serde_json::from_str::<ByteRate>("1024").unwrap().0, 1024);
        assert_eq!(serde_json::from_str::<ByteRate>(&json).unwrap(), r);
        assert_eq!(ByteRate::clamped(0).bytes_per_sec(), 1);
        assert_eq!(ByteRate::clamped(5 << 20).bytes_per_sec(), 5 << 20);
    }

    #[test]
    fn limits_validate() {
        assert_eq!(IoLimits::default().validate(), Err(PolicyError::Empty));
        let w = |w| IoLimits {
            weight: Some(w),
            ..IoLimits::default()
        };
        assert!(w(1).validate().is_ok());
        assert!(w(1000).validate().is_ok());
        assert_eq!(w(0).validate(), Err(PolicyError::Weight(0)));
        assert_eq!(w(1001).validate(), Err(PolicyError::Weight(1001)));
        let iops = IoLimits {
            write_iops: Some(0),
            ..IoLimits::default()
        };
        assert!(matches!(
            iops.validate(),
            Err(PolicyError::Iops {
                what: "write_iops",
                ..
            })
        ));
        let ok = IoLimits {
            read_iops: Some(500),
            write_bps: Some("1M".parse().unwrap()),
            ..IoLimits::default()
        };
        assert!(ok.validate().is_ok());
        assert!(toml::from_str::<IoLimits>("weight = 10\nbogus = 1").is_err());
    }

    #[test]
    fn shares_follow_weights_among_busy_groups() {
        assert_eq!(
            weight_shares(700, &[(100, true), (600, true)]),
            vec![100, 600]
        );
        // An idle group's share goes to the busy ones.
        assert_eq!(
            weight_shares(700, &[(100, true), (600, false)]),
            vec![700, 0]
        );
        assert_eq!(
            weight_shares(700, &[(100, false), (600, false)]),
            vec![0, 0]
        );
        let s = weight_shares(u64::MAX, &[(1000, true), (1, true)]);
        assert!(s[0] > s[1] && s[1] > 0);
    }

    /// One 50 ms step of groups that always have more to write on a
    /// device that does `device` bytes/s.
    fn busy_step(c: &mut CapacityEstimate, device: f64) -> bool {
        let cap = c.bps() as f64;
        c.update(cap.min(device), cap, true, 0.05)
    }

    #[test]
    fn capacity_probes_up_and_settles_at_the_device() {
        let device = 3.0e9;
        let mut c = CapacityEstimate::new(64 << 20, 1 << 20);
        // Slow start reaches a fast device within seconds of 50 ms steps.
        let mut seconds = 0.0;
        while (c.bps() as f64) < 0.8 * device {
            busy_step(&mut c, device);
            seconds += 0.05;
            assert!(seconds < 5.0, "slow start too slow: {}", c.bps());
        }
        let mut low = f64::MAX;
        let mut high = 0.0f64;
        for i in 0..2000 {
            busy_step(&mut c, device);
            if i > 200 {
                low = low.min(c.bps() as f64);
                high = high.max(c.bps() as f64);
            }
        }
        assert!(low > 0.75 * device && high < 1.3 * device, "{low}..{high}");
        // Moves at most once per window.
        let moves = (0..100).filter(|_| busy_step(&mut c, device)).count();
        assert!(moves <= 100 / 10, "{moves}");
        // Light groups teach nothing (once the window in progress is over).
        for _ in 0..10 {
            c.update(0.0, 1e9, false, 0.05);
        }
        let before = c.bps();
        for _ in 0..20 {
            assert!(!c.update(0.0, 1e9, false, 0.05));
        }
        assert_eq!(c.bps(), before);
        // A window with half its steps light teaches nothing either.
        c.update(0.0, 1e9, true, 0.25);
        c.update(0.0, 1e9, false, 0.25);
        assert_eq!(c.bps(), before);
        // One short window alone (a stall) does not move it; two do.
        let mut c = CapacityEstimate::new(before, 1 << 20);
        c.slow_start = false;
        assert!(!c.update(0.0, 1e9, true, 0.5));
        assert!(c.update(0.0, 1e9, true, 0.5));
        assert_eq!(c.bps(), before / 2);
        // Never below the floor; bad input ignored.
        for _ in 0..100 {
            c.update(0.0, 1e9, true, 1.0);
        }
        assert_eq!(c.bps(), 1 << 20);
        assert!(!c.update(f64::NAN, 1e9, true, 1.0));
        assert!(!c.update(1e9, 1e9, true, 0.0));
    }

    #[test]
    fn capacity_leaves_slow_start_once_the_device_binds() {
        let device = 200.0e6;
        let mut c = CapacityEstimate::new(64 << 20, 1 << 20);
        for _ in 0..400 {
            busy_step(&mut c, device);
        }
        assert!(!c.slow_start);
        // From then on it probes slowly: within a window or two of probing
        // above the device, and never far below it.
        for _ in 0..400 {
            busy_step(&mut c, device);
            let est = c.bps() as f64;
            assert!(est < 1.3 * device && est > 0.75 * device, "{est}");
        }
    }

    #[test]
    fn capacity_recovers_quickly_from_a_stall_at_start() {
        let device = 3.0e9;
        let mut c = CapacityEstimate::new(64 << 20, 1 << 20);
        // Nothing gets through in the first window (the helper's first
        // flush stalls): nothing learnt. Two such windows: half the
        // estimate, still in slow start (nothing has been measured yet).
        assert!(!c.update(0.0, c.bps() as f64, true, 0.5));
        assert!(c.update(0.0, c.bps() as f64, true, 0.5));
        assert!(c.slow_start);
        assert_eq!(c.bps(), 32 << 20);
        let mut seconds = 0.0;
        while (c.bps() as f64) < 0.8 * device {
            busy_step(&mut c, device);
            seconds += 0.05;
            assert!(seconds < 10.0, "recovery too slow: {}", c.bps());
        }
    }

    #[test]
    fn capacity_falls_when_flushing_cannot_keep_up() {
        // The groups have dirty pages waiting but get only 50 MB/s through
        // (slow flushing), never their rates: the estimate comes down to
        // what gets through, so that weights bind again.
        let mut c = CapacityEstimate::new(1 << 30, 1 << 20);
        for _ in 0..200 {
            c.update(50e6, c.bps() as f64, true, 0.05);
        }
        let est = c.bps() as f64;
        assert!(est < 60e6 && est > 45e6, "{est}");
    }

    #[test]
    fn watermarks_scale_with_rate() {
        assert_eq!(watermarks(Some(1 << 20)), (8 << 20, 4 << 20));
        assert_eq!(watermarks(Some(400 << 20)), (100 << 20, 50 << 20));
        assert_eq!(watermarks(None), (32 << 20, 16 << 20));
    }

    #[test]
    fn debt_grows_by_leaks_and_is_repaid_at_rate() {
        let r = Some(10 << 20);
        assert_eq!(next_debt(0, 5 << 20, r, false, 1.0), 5 << 20);
        assert_eq!(next_debt(5 << 20, 0, r, false, 1.0), 5 << 20);
        assert_eq!(next_debt(15 << 20, 0, r, true, 1.0), 5 << 20);
        assert_eq!(next_debt(5 << 20, 0, r, true, 1.0), 0);
        assert_eq!(next_debt(5 << 20, 1, None, false, 1.0), 0);
    }

    #[test]
    fn enforcement_has_hysteresis_and_debt_wins() {
        let wm = (100, 50);
        use Enforce::*;
        let cases = [
            (Running, 100, 0, Running),
            (Running, 101, 0, Paused),
            (Paused, 60, 0, Paused),
            (Paused, 50, 0, Running),
            (Running, 0, 1, Repaying),
            (Paused, 0, 1, Repaying),
            (Repaying, 0, 0, Running),
            (Repaying, 80, 0, Paused),
        ];
        for (from, pending, debt, to) in cases {
            assert_eq!(
                next_enforce(from, pending, debt, wm),
                to,
                "{from:?} {pending} {debt}"
            );
        }
        assert!(Paused.writers_paused() && Paused.flush_allowed());
        assert!(Repaying.writers_paused() && !Repaying.flush_allowed());
        for s in [Running, Paused, Repaying] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
        }
        assert!(!Running.writers_paused());
    }
}
