//! The slow half of the shaper, pure: admission control, sharing the spare
//! capacity, demand estimation and the per-class datapath parameters.
//!
//! All rates here are wire bytes per second (what tc and HTB count).

use qos_common::{
    net::{ClassConfig, LOWEST_PRIORITY, NetGlobal},
    policy::{MAX_RATE, UNIT, USE_UNIT_BYTES},
};
use std::f64::consts::LN_2;

/// A class as the allocator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassDemand {
    pub guarantee: u64,
    pub ceil: u64,
    pub priority: u32,
    /// Bytes/s the class would use if it could; None = as much as it gets.
    pub demand: Option<u64>,
}

impl ClassDemand {
    fn wanted_total(&self) -> u64 {
        let cap = self.ceil.max(self.guarantee);
        match self.demand {
            Some(d) => d.min(cap),
            None => cap,
        }
    }
}

/// Splits the capacity that guaranteed demand leaves unused among the
/// classes that want more than their guarantee: strictly by priority (0
/// first), and within a priority in proportion to the guarantees, never above
/// a class's ceiling or demand (water-filling). Returns each class's share of
/// the spare ("borrow rate"), in input order.
pub fn share_spare(capacity: u64, classes: &[ClassDemand]) -> Vec<u64> {
    let used: u64 = classes
        .iter()
        .map(|c| c.guarantee.min(c.demand.unwrap_or(u64::MAX)))
        .fold(0u64, u64::saturating_add);
    let mut spare = capacity.saturating_sub(used);
    let mut extra = vec![0u64; classes.len()];
    for prio in 0..=LOWEST_PRIORITY {
        if spare == 0 {
            break;
        }
        // (index, weight, room)
        let mut open: Vec<(usize, u64, u64)> = classes
            .iter()
            .enumerate()
            .filter(|(_, c)| c.priority == prio)
            .filter_map(|(i, c)| {
                let room = c.wanted_total().saturating_sub(c.guarantee);
                (room > 0).then_some((i, c.guarantee.max(1), room))
            })
            .collect();
        while spare > 0 && !open.is_empty() {
            let total_w: u128 = open.iter().map(|&(_, w, _)| w as u128).sum();
            // Classes whose proportional share would exceed their room get
            // their room; the rest is shared again among the others.
            let capped: Vec<usize> = open
                .iter()
                .enumerate()
                .filter(|&(_, &(_, w, room))| (spare as u128 * w as u128) / total_w >= room as u128)
                .map(|(k, _)| k)
                .collect();
            if capped.is_empty() {
                let mut given = 0;
                for &(i, w, _) in &open {
                    let share = (spare as u128 * w as u128 / total_w) as u64;
                    extra[i] += share;
                    given += share;
                }
                spare -= given;
                // Rounding leftovers (< number of classes bytes/s) go to the
                // heaviest class so that nothing is lost.
                if spare > 0
                    && let Some(&(i, _, room)) = open.iter().max_by_key(|&&(_, w, _)| w)
                {
                    let add = spare.min(room.saturating_sub(extra[i]));
                    extra[i] += add;
                    spare -= add;
                }
                break;
            }
            for &k in capped.iter().rev() {
                let (i, _, room) = open.swap_remove(k);
                extra[i] += room;
                spare -= room;
            }
        }
    }
    extra
}

/// What the last control interval showed about one class.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observation {
    /// Smoothed rate the class sent at, bytes/s.
    pub rate: f64,
    /// Rate the allocator gave it last time (guarantee + share), bytes/s.
    pub alloc: u64,
    /// Bytes beyond its profile or dropped during the interval.
    pub over_bytes: u64,
    pub dropped_bytes: u64,
    pub bytes: u64,
    /// Smoothed `qos_common::policy::class_fill` of the class (-1 ..= 1).
    pub fill: f64,
}

/// A class is taken to want more when it uses (nearly) all it was given, had
/// to be held back, or spends its tokens as fast as they come (its buckets
/// stay below half full: the pacing loop keeps a busy class near an eighth).
/// Otherwise its demand is what it uses plus headroom. The bucket test keeps
/// a busy class from being judged idle by one slow measurement interval,
/// which would make the allocation flap.
pub fn estimate_demand(o: &Observation) -> Option<u64> {
    let held_back = o.dropped_bytes > 0 || o.over_bytes * 20 > o.bytes.max(1);
    if held_back || o.rate >= 0.9 * o.alloc as f64 || o.fill < 0.5 {
        None
    } else {
        Some((o.rate * 1.25) as u64 + 1)
    }
}

/// A class receives traffic no window holds when that is more than 1 / this
/// of its rate ([`receives_unheld`]).
pub const UNHELD_SHARE: f64 = 8.0;
/// ... and at least 1 / this of the capacity.
pub const UNHELD_MIN_OF_CAPACITY: f64 = 100.0;
/// ... for this long without a break (a TCP flow passes its first 20 ms
/// unheld, before its first window step).
pub const UNHELD_HOLD_NS: u64 = 200_000_000;
/// Window-held classes stay held at their allocations this long after the
/// last class that received traffic no window holds ([`datapath_ceil`]).
pub const HOLD_AT_ALLOC_NS: u64 = 1_000_000_000;

/// Whether a class whose smoothed rate is `rate` bytes/s, of which
/// `unheld_rate` neither a receive window nor CE marks held, receives
/// traffic no window holds (UDP beside window-held TCP; see
/// [`datapath_ceil`]). ECN flows that no window holds are held by marks
/// and do not count: a TCP sender's congestion window grows where a queue
/// upstream lengthens its round trip, a UDP sender waiting on the queue
/// does not send more (counted, a marked ECN class held the window-held
/// class beside it at its allocation, which lost 5.5 % of its packets to
/// the ceiling's spaced drops).
pub fn receives_unheld(unheld_rate: f64, rate: f64, capacity: u64) -> bool {
    unheld_rate * UNHELD_SHARE > rate && unheld_rate * UNHELD_MIN_OF_CAPACITY >= capacity as f64
}

/// How long a class that receives traffic no window holds is taken to want
/// as much as it gets (greedy, never lent out) once that traffic starts
/// ([`unheld_traffic_starting`]).
pub const UNHELD_START_NS: u64 = 2_000_000_000;

/// Whether a class that has received traffic no window holds since
/// `unheld_since` is still starting: its low rate then does not say it wants
/// less (it is taken to be greedy), because the window-held flows beside it
/// may be what keeps it low. They share the queue upstream, and whichever
/// started first holds it: the fairness script's udp scenario, on a 2-CPU
/// host, saw the UDP class at 22-170 Mbit/s for its first 1.4 s while its
/// share was lent to the TCP class (900 of 1000) that kept it there.
/// Silence still lends its share at once.
pub fn unheld_traffic_starting(unheld_since: Option<u64>, now_ns: u64) -> bool {
    unheld_since.is_some_and(|t| now_ns.saturating_sub(t) < UNHELD_START_NS)
}

/// Control steps without a byte received after which a class is idle (its
/// share lent out at once; [`silent_steps`]), at the least.
pub const SILENT_STEPS_MIN: u32 = 3;
/// Time beyond its flows' round trip a class from afar must receive nothing
/// for to be idle.
pub const SILENT_SLACK_US: u64 = 10_000;
/// Longest round trip [`silent_steps`] waits out.
pub const SILENT_RTT_MAX_US: u64 = 500_000;

/// Control steps of `step_ns` without a byte received after which a class
/// whose flows' round trip is `rtt_us` is idle: three, or that round trip
/// and 10 ms more where longer. While their windows ramp, flows from afar
/// arrive in bursts once per round trip: from 60 ms away, one-idle's two
/// busy classes each went 30-70 ms without a byte several times in their
/// first 400 ms, and each time lent its share to the other (allocations
/// moving between 5 and 20 Mbit/s, and 15 and 6; the 6.1 VM, 2026-12-07).
pub fn silent_steps(rtt_us: u64, step_ns: u64) -> u32 {
    let span_ns = rtt_us
        .min(SILENT_RTT_MAX_US)
        .saturating_add(SILENT_SLACK_US)
        .saturating_mul(1_000);
    let steps = span_ns.div_ceil(step_ns.max(1));
    u32::try_from(steps)
        .unwrap_or(u32::MAX)
        .max(SILENT_STEPS_MIN)
}

/// Round trips of its flows for which a class waking from silence keeps its
/// share ([`waking`]).
pub const WAKE_ROUND_TRIPS: u64 = 16;
/// ... at most this long.
pub const WAKE_MAX_NS: u64 = 2_000_000_000;
/// ... from a control step in which it received at least 1 / this of its
/// guarantee ([`wakes_with`]).
pub const WAKE_MIN_SHARE: f64 = 8.0;

/// Whether a class that received at `step_rate` bytes/s over a control step
/// (not smoothed) wakes with it: that rate is at least an eighth of its
/// `guarantee` (any traffic for a class without one). A class that
/// receives less (a handshake, a control exchange, keepalives) is judged
/// by its rate at once. Kept greedy for the hold after each such trickle,
/// on-off's returning class took its share back from the borrowers for
/// 100 ms at a time before its data came, and a borrower 60 ms away, its
/// ACKs then paced at a third of the rate its windows were sized for,
/// received nothing for 120 ms. The step's own rate, not the smoothed one,
/// so that a flow's first burst wakes its class at once (the smoothed rate
/// takes a fifth of it in its first step).
pub fn wakes_with(step_rate: f64, guarantee: u64) -> bool {
    step_rate > 0.0 && step_rate * WAKE_MIN_SHARE >= guarantee as f64
}

/// Whether a class that woke at `woke_ns` ([`wakes_with`]; None: it has not
/// since its last silence), whose flows' round trip is `rtt_us`, is still
/// waking at `now_ns`: for sixteen round trips (at least `hold_ns`, the
/// demand hysteresis; at most two seconds), whatever its rate meanwhile.
/// It then keeps its share ([`share_spare_waking`]). Its flows' windows
/// ramp for several round trips, sized from what it is allocated, and its
/// buckets start full, so until its rate has caught up the estimate (rate
/// under nine tenths of the allocation, buckets over half full) reads a
/// ramp as a class that wants less. From 60 ms away that lent a starting
/// class's share out within its first 100 ms: the narrower windows then
/// kept it from showing more, and one-idle's 2 Mbit/s class (5 expected)
/// got 1.5-3 Mbit/s for 1-1.5 s in four of eight runs while its
/// allocation moved between 2, 5 and 20 (the 6.1 VM, 2026-12-07). Sixteen
/// round trips cover slow start to a window of 2^16 initial windows and
/// the rate's smoothing.
pub fn waking(woke_ns: Option<u64>, now_ns: u64, rtt_us: u64, hold_ns: u64) -> bool {
    let wake_ns = round_trips_waking_ns(rtt_us).max(hold_ns);
    woke_ns.is_some_and(|t| now_ns.saturating_sub(t) < wake_ns)
}

/// Sixteen round trips of `rtt_us`, at most two seconds, in ns.
fn round_trips_waking_ns(rtt_us: u64) -> u64 {
    WAKE_ROUND_TRIPS
        .saturating_mul(rtt_us)
        .saturating_mul(1_000)
        .min(WAKE_MAX_NS)
}

/// Whether a class whose flows' round trip is `rtt_us` wakes for longer
/// than `hold_ns` ([`waking`]): only then do the others hand its share
/// back as its rate grows ([`share_spare_waking`]). A nearer class ramps
/// within the hold, and takes its share back at once as before.
pub fn wakes_from_afar(rtt_us: u64, hold_ns: u64) -> bool {
    round_trips_waking_ns(rtt_us) > hold_ns
}

/// [`share_spare`] with waking classes from afar ([`wakes_from_afar`]): `waking[i]` is
/// `Some(estimate)` for a waking class, what its rate says it wants
/// ([`estimate_demand`]). A waking class gets its share as if greedy (its
/// entry in `classes`); the others get theirs as if it wanted its estimate,
/// so they hand its share back as its rate grows, not at once. For that
/// while the allocations may add up to more than the capacity, by at most
/// what the waking classes do not use yet. Cut at once from 15 to 6 Mbit/s
/// when on-off's class returned, a borrower 60 ms away was paced at a
/// third of the rate its windows in flight were sized for and received
/// nothing for 120 ms.
pub fn share_spare_waking(
    capacity: u64,
    classes: &[ClassDemand],
    waking: &[Option<Option<u64>>],
) -> Vec<u64> {
    let greedy = share_spare(capacity, classes);
    if waking.iter().all(Option::is_none) {
        return greedy;
    }
    let as_seen: Vec<ClassDemand> = classes
        .iter()
        .zip(waking)
        .map(|(c, w)| match w {
            Some(estimate) => ClassDemand {
                demand: *estimate,
                ..*c
            },
            None => *c,
        })
        .collect();
    let rest = share_spare(capacity, &as_seen);
    greedy
        .into_iter()
        .zip(rest)
        .zip(waking)
        .map(|((g, r), w)| if w.is_some() { g } else { r })
        .collect()
}

/// Ceiling the datapath holds a class to: its configured one (`ceil`), or
/// its allocation `alloc` where lower while `hold_at_alloc`: its flows are
/// window-held and another class receives traffic no window holds.
///
/// Such traffic (UDP) whose sender waits on the same queue upstream as the
/// window-held TCP senders gets what the windows leave it, whatever they
/// are sized for: a UDP class got 56-329 of its 500 Mbit/s beside a TCP
/// class; with its share kept back from the TCP class, whose windows were
/// then sized for 500, 83-85. Held at an allocation by its ceiling bucket
/// (CE marks for ECN flows, spaced drops otherwise; see
/// `qos_common::policy::past_ceiling`), the TCP class leaves the queue
/// room: with a 500 ceiling configured on it, the UDP class got 498-499.
/// The allocation includes what the UDP class lends (what it does not
/// use), so the class is held as HTB would hold it: as the UDP class gets
/// more, it lends less.
///
/// `windows_hold`: the class's windows hold it (its ACKs are not paced):
/// they are steered to its allocation ([`held_window_mult`]), or for its
/// first 250 ms sized at [`HELD_WINDOW_MULT`]; the ceiling is then a
/// backstop 1/[`HELD_CEIL_HEADROOM_DIV`] above the allocation, not the
/// control, so a class that starts beside UDP may take up to 1.25 × its
/// allocation for those 250 ms.
pub fn datapath_ceil(ceil: u64, alloc: u64, hold_at_alloc: bool, windows_hold: bool) -> u64 {
    if !hold_at_alloc {
        return ceil;
    }
    let headroom = if windows_hold {
        alloc / HELD_CEIL_HEADROOM_DIV
    } else {
        0
    };
    ceil.min(alloc.saturating_add(headroom).max(1))
}

/// The held ceiling of a class whose windows are steered to its allocation
/// is that allocation + 1/4 of it ([`datapath_ceil`]).
///
/// At the allocation itself the bucket of a class steered there hovers at
/// empty, and its CE marks now and then cut the flow's congestion window to
/// 2 segments. On a host whose UDP sender was CPU-bound (2 CPUs, the
/// fairness script's udp scenario) the flow then ran faster, not slower:
/// segment by segment, its ACKs' work starved the UDP sender, the queue
/// upstream emptied, and no window holds a flow on an empty queue (780-930
/// Mbit/s of a 500 allocation, then drops and a stall; p5 0.00-0.40 for one
/// class or the other in 4 of 5 runs). With 1/32 or 1/16 above the
/// allocation that still happened in 1 run of 4 and 3 of 6; with 1/4, in
/// none of 5 (p5 0.92-0.96, 2-24 CE marks, no drop), and 1/2 did no better.
/// Beyond the allocation the class takes only what the UDP class does not
/// (it is held by its windows); the backstop bounds what it takes when they
/// fail.
pub const HELD_CEIL_HEADROOM_DIV: u64 = 4;

/// Multiplier the receive windows of a class held at its allocation
/// ([`datapath_ceil`]; `ClassConfig::window_mult`) are sized at until
/// [`held_window_mult`] steers them (once it has received for
/// [`WINDOW_STEER_AFTER_NS`]): windows sized for the usual queue upstream
/// starved it where UDP kept a deeper queue there (the VM, 50 Mbit/s, a
/// 256 KB buffer: 41 ms; the TCP class got 0.66-0.70 of its allocation, the
/// UDP class 1.30-1.34), and its ceiling bucket (1/4 above its allocation)
/// bounds it meanwhile.
pub const HELD_WINDOW_MULT: u64 = qos_common::policy::MULT_MAX;

/// A class whose received flows are held by their windows, as the loop
/// that sizes its windows ([`window_mults`]) sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowClass {
    /// Its allocation in effect, bytes/s.
    pub alloc: f64,
    /// Its smoothed received rate, bytes/s.
    pub rate: f64,
    /// The loop's integral from its last step ([`WindowMult::integral`]).
    pub mult: f64,
    /// Busy and held by its windows alone: steered. Others are sized at 1.
    pub steered: bool,
    /// Looks like it wants less than its allocation: steered, but left
    /// out of the normalisation (a class its windows hold short looks the
    /// same until its multiplier rises).
    pub wants_less: bool,
}

/// Integral gain of [`window_mults`], per second, and its proportional
/// gain. Host, on-off and all-busy, two 6 s runs each of the build with
/// [`WINDOW_STEER_AFTER_NS`]: 2 and 8 held every busy class at 0.98-1.03 of
/// its quota in its worst 100 ms windows (p5); 1 and 4 gave on-off 0.97 /
/// 1.02 / 0.97 in one run. Before that rule, 1 and 4 gave on-off 0.85-0.93,
/// 2 and 8 0.91, 1 and 12 0.91-0.92.
pub const WINDOW_LOOP_KI: f64 = 8.0;
pub const WINDOW_LOOP_KP: f64 = 2.0;
/// A class is steered by [`window_mults`] once it has received this long
/// without falling silent: its smoothed rate (50 ms) rises from 0 when it
/// starts, and steered at once it wound its multiplier up to the bound and
/// the others' down (on-off: the two busy classes fell to 0.88-0.92 of
/// their shares half a second after the third came back).
pub const WINDOW_STEER_AFTER_NS: u64 = 250_000_000;
/// Bounds of a window multiplier set by [`window_mults`].
pub const WINDOW_MULT_MIN: f64 = 0.5;
pub const WINDOW_MULT_MAX: f64 = 4.0;

/// What [`window_mults`] says of one class.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowMult {
    /// The loop's integral, kept for its next step.
    pub integral: f64,
    /// The multiplier its windows are to be sized at.
    pub applied: f64,
}

/// Next multipliers of the windows of window-held classes (ingress
/// without ACK pacing, `qos_common::policy::unpaced_window_clamp`): each
/// steered class's multiplier moves (proportional and integral action, in
/// log space) so that its rate over its allocation comes to the steered
/// classes' common ratio, their bytes over their allocations. The
/// integrals are normalised to a geometric mean of 1 (weighed by
/// allocation), so the windows add up to what the shared queue upstream
/// is sized for.
///
/// The link upstream runs faster than the capacity, so every class gets
/// more than its allocation; what matters is that they all get the same
/// proportion of it. Windows in proportion give rates only roughly in
/// proportion (receivers reopen their windows in steps), and a loop on
/// each class's own bucket (the datapath's multiplier) could only raise a
/// class that fell short, never lower the one that took the excess:
/// all-busy's 300 Mbit/s class got 350 while the 100 Mbit/s one swung
/// between 91 and 114 over 2 s.
pub fn window_mults(classes: &[WindowClass], dt_ns: u64) -> Vec<WindowMult> {
    let neutral = WindowMult {
        integral: 1.0,
        applied: 1.0,
    };
    let steered = || classes.iter().filter(|c| c.steered);
    let (bytes, alloc) = steered().fold((0.0, 0.0), |(b, a), c| (b + c.rate, a + c.alloc));
    if steered().count() < 2 || bytes <= 0.0 || alloc <= 0.0 {
        return vec![neutral; classes.len()];
    }
    let common = bytes / alloc;
    let errors: Vec<f64> = classes
        .iter()
        .map(|c| {
            if !c.steered {
                return 0.0;
            }
            let ratio = (c.rate / c.alloc).max(common / 4.0);
            log_error(common / ratio)
        })
        .collect();
    let mut logs: Vec<f64> = classes
        .iter()
        .zip(&errors)
        .map(|(c, e)| {
            if c.steered {
                integrated_log(c.mult, *e, dt_ns, WINDOW_MULT_MIN)
            } else {
                0.0
            }
        })
        .collect();
    let anchored = |c: &WindowClass| c.steered && !c.wants_less;
    let anchor = if classes.iter().any(anchored) {
        anchored
    } else {
        |c: &WindowClass| c.steered
    };
    let (weighted, weight) = classes
        .iter()
        .zip(&logs)
        .filter(|(c, _)| anchor(c))
        .fold((0.0, 0.0), |(l, w), (c, cl)| {
            (l + c.alloc * cl, w + c.alloc)
        });
    let mean = weighted / weight;
    for (c, l) in classes.iter().zip(logs.iter_mut()) {
        if c.steered {
            *l = (*l - mean).clamp(WINDOW_MULT_MIN.ln(), WINDOW_MULT_MAX.ln());
        }
    }
    logs.iter()
        .zip(&errors)
        .map(|(l, e)| WindowMult {
            integral: l.exp(),
            applied: applied_mult(*l, *e, WINDOW_MULT_MIN),
        })
        .collect()
}

/// A window loop's error in log space, the wanted over the measured
/// ratio, within ±ln 2.
fn log_error(wanted_over_measured: f64) -> f64 {
    wanted_over_measured.ln().clamp(-LN_2, LN_2)
}

/// A window loop's integral `mult` (within `min` ..
/// [`WINDOW_MULT_MAX`]) moved by `error` over `dt_ns` (at most 100 ms
/// counted), in log space, unbounded.
fn integrated_log(mult: f64, error: f64, dt_ns: u64, min: f64) -> f64 {
    let step = WINDOW_LOOP_KI * dt_ns.min(100_000_000) as f64 / 1e9;
    mult.clamp(min, WINDOW_MULT_MAX).ln() + step * error
}

/// The multiplier a window loop applies: its integral `log` plus the
/// proportional term, within `min` .. [`WINDOW_MULT_MAX`].
fn applied_mult(log: f64, error: f64, min: f64) -> f64 {
    (log + WINDOW_LOOP_KP * error)
        .exp()
        .clamp(min, WINDOW_MULT_MAX)
}

/// What a class held at its allocation ([`datapath_ceil`]) is steered
/// to receive, over that allocation, by [`held_window_mult`].
pub const HELD_RATE_TARGET: f64 = 1.0;

/// Next multiplier of the windows of a busy class held at its allocation
/// beside traffic no window holds (UDP): its windows alone move (the same
/// gains as [`window_mults`], down to [`HELD_WINDOW_MULT_MIN`]) so that its
/// rate comes to
/// [`HELD_RATE_TARGET`] × `target` (bytes/s: its allocation, or under a
/// ceiling that binds it [`held_target`]'s). `mult` is the loop's integral
/// from its last step.
///
/// Its ceiling bucket holds it there per packet as well, but that is the
/// backstop, not the control: with windows at [`HELD_WINDOW_MULT`] the
/// ceiling alone held the TCP class of the fairness script's udp scenario,
/// by CE marks and then by drops once its debt reached the hard threshold
/// (0.4-2.1 % of its packets, and stalls: p5 0.00-0.95). A flow and a UDP
/// sender sharing a queue upstream get it in proportion to what each keeps
/// there, so a window is what sets the TCP class's part. Steered, seven
/// 6 s runs on the first host: no TCP drop, 25-4 924 CE marks, p5 0.89-0.98
/// of the quota for either class; the two classes' 100 ms windows trade
/// against each other (their sum stays at the link's rate), and gains of
/// 1 / 4 or 0.5 / 4 did no better. On a second host, whose UDP sender is
/// CPU-bound, that needed the lower bound and the ceiling's headroom
/// ([`HELD_WINDOW_MULT_MIN`], [`HELD_CEIL_HEADROOM_DIV`]).
pub fn held_window_mult(mult: f64, rate: f64, target: f64, dt_ns: u64) -> WindowMult {
    window_mult_to(mult, rate, HELD_RATE_TARGET * target, dt_ns)
}

/// Next multiplier of the windows of a class whose configured ceiling binds
/// it ([`ceiling_binds`]): steered alone, as a held class is
/// ([`held_window_mult`]), so that its rate comes to [`CEIL_RATE_TARGET`] ×
/// that ceiling, where its ceiling bucket does not act.
///
/// In the loop over all classes ([`window_mults`]) such a class got the
/// link's excess over the capacity like every other (104 % of its share on
/// the fairness script's host), and its ceiling bucket took it back by CE
/// marks (priority: 6 763 in 6 s) or, for a flow without ECN, by spaced
/// drops (0.3-0.5 % of its packets at a 300 ceiling beside a busy class).
///
/// `policed`: its ceiling bucket marked or dropped it in the last interval
/// (a window-held class is marked and dropped by nothing else; with
/// `ingress_clamp_ecn = false` its ECN flows' marks count too, and its
/// other flows' windows then give way to them). Its rate is
/// then clipped at the ceiling by the bucket, so the error is 1 % however
/// far its windows would take it past, and they came down in 1-2 s,
/// dropped all along (a flow without ECN at a 300 ceiling: 37 packets
/// after its first second in one run of five). Each such interval takes
/// the integral down by [`CEIL_POLICED_BACKOFF`] first.
pub fn ceiling_window_mult(
    mult: f64,
    rate: f64,
    ceil: f64,
    policed: bool,
    dt_ns: u64,
) -> WindowMult {
    let mult = if policed {
        let kept = mult.clamp(HELD_WINDOW_MULT_MIN, WINDOW_MULT_MAX);
        (kept * CEIL_POLICED_BACKOFF).max(kept.min(WINDOW_MULT_MIN))
    } else {
        mult
    };
    window_mult_to(mult, rate, CEIL_RATE_TARGET * ceil, dt_ns)
}

/// The multiplier of a class's windows while no loop steers them, left
/// where it was (within the bounds of [`window_mult_to`]): a class at its
/// ceiling ([`ceiling_window_mult`]) that fell silent for a moment (a
/// retransmission timeout) resumes where its windows held it.
pub fn window_mult_kept(integral: f64) -> WindowMult {
    WindowMult {
        integral,
        applied: integral.clamp(HELD_WINDOW_MULT_MIN, WINDOW_MULT_MAX),
    }
}

/// The rate (bytes/s) a class held at its allocation `alloc` beside
/// traffic no window holds ([`held_window_mult`]) is steered to: that
/// allocation, or [`CEIL_RATE_TARGET`] × its configured ceiling `ceil`
/// where that ceiling binds it ([`ceiling_binds`]). Its datapath ceiling
/// is then the configured one, no backstop above the allocation
/// ([`datapath_ceil`]), and at the allocation itself its bucket would
/// hover at empty: CE marks that cut the flow to two segments (see
/// [`HELD_CEIL_HEADROOM_DIV`]).
pub fn held_target(alloc: u64, ceil: u64, ceiling_binds: bool) -> f64 {
    if ceiling_binds {
        (alloc as f64).min(CEIL_RATE_TARGET * ceil as f64)
    } else {
        alloc as f64
    }
}

/// What each interval in which its ceiling bucket polices a class at its
/// ceiling does to its windows' integral ([`ceiling_window_mult`]): a
/// multiplicative decrease, like a sender's on a loss, whatever the
/// clipped rate says, down to [`WINDOW_MULT_MIN`] (a class alone on a link
/// that is not full is policed all along, and its windows hold nothing
/// there; below that bound only its rate's error moves them). Steering to
/// a lower target while policed instead made a limit cycle: its
/// proportional kick took the class under the ceiling, the next
/// interval's back over.
pub const CEIL_POLICED_BACKOFF: f64 = 0.97;

/// What a class whose configured ceiling binds it is steered to receive,
/// over that ceiling ([`ceiling_window_mult`]): a little under it, so that
/// its 100 ms windows' swings (a few per cent) stay under the ceiling
/// bucket, which marks or drops past it.
pub const CEIL_RATE_TARGET: f64 = 0.99;

/// Whether the configured ceiling `ceil` of a class binds it: it is below
/// the `capacity` and the allocator gave the class all of it (`alloc`,
/// bytes/s). Its windows are then steered to it ([`ceiling_window_mult`]),
/// not shared out with the other classes' ([`window_mults`]). That they
/// hold it needs a queue upstream (a full link); where there is none its
/// ceiling bucket holds it.
pub fn ceiling_binds(alloc: u64, ceil: u64, capacity: u64) -> bool {
    ceil < capacity && alloc >= ceil
}

/// One step of a loop that steers a class's windows on their own so that
/// its `rate` comes to `target` (bytes/s), with [`window_mults`]'s gains,
/// between [`HELD_WINDOW_MULT_MIN`] and [`WINDOW_MULT_MAX`].
fn window_mult_to(mult: f64, rate: f64, target: f64, dt_ns: u64) -> WindowMult {
    if rate <= 0.0 || target <= 0.0 {
        return window_mult_kept(mult);
    }
    let error = log_error(target / rate);
    let log = integrated_log(mult, error, dt_ns, HELD_WINDOW_MULT_MIN)
        .clamp(HELD_WINDOW_MULT_MIN.ln(), WINDOW_MULT_MAX.ln());
    WindowMult {
        integral: log.exp(),
        applied: applied_mult(log, error, HELD_WINDOW_MULT_MIN),
    }
}

/// Lowest multiplier [`held_window_mult`] sizes windows at: below the
/// classes' loop's [`WINDOW_MULT_MIN`]. Where the UDP sender keeps the
/// queue upstream short (a 2-CPU host whose UDP sender was CPU-bound), a
/// held class's windows at 0.5 still took 1.02-1.14 × its allocation of the
/// fairness script's udp scenario, and the UDP class got p5 0.67-0.97; at
/// 1/8 the steered windows sat at 0.35-0.55 and the TCP class at 1.00-1.01.
pub const HELD_WINDOW_MULT_MIN: f64 = qos_common::policy::WINDOW_MULT_FLOOR as f64 / UNIT as f64;

/// How long a held class's steered windows ([`held_window_mult`]) outlast
/// a silence: a TCP flow cut by the ceiling's drops waits out a
/// retransmission timeout (200 ms at least), and resuming at
/// [`HELD_WINDOW_MULT`] after it sent the flow back over its allocation at
/// once: more CE marks and drops, another stall. On the fairness script's
/// udp scenario that cycle (every 0.5-0.7 s) gave the TCP class 100 ms
/// windows of 0 and the UDP class ones of 150-250 (p5 0.00 / 0.32).
pub const HELD_STEER_KEPT_NS: u64 = DROP_STALL_NS;

/// Multiplier of a held class's windows while [`held_window_mult`] does not
/// steer them (it has not received for [`WINDOW_STEER_AFTER_NS`] without
/// falling silent): the loop's integral where it steered them within
/// [`HELD_STEER_KEPT_NS`] (`last_steered_ns`), [`HELD_WINDOW_MULT`]
/// otherwise (a class that starts). The integral is left as it is: a
/// stalled class's low rate says nothing of its windows.
pub fn held_window_rest(integral: f64, last_steered_ns: Option<u64>, now_ns: u64) -> WindowMult {
    let kept = last_steered_ns.is_some_and(|t| now_ns.saturating_sub(t) < HELD_STEER_KEPT_NS);
    WindowMult {
        integral,
        applied: if kept {
            integral.clamp(HELD_WINDOW_MULT_MIN, WINDOW_MULT_MAX)
        } else {
            HELD_WINDOW_MULT as f64 / UNIT as f64
        },
    }
}

/// How long after a drop a class's silence or low rate says nothing about
/// its demand: a TCP flow that lost a packet may wait out a retransmission
/// timeout (200 ms at least, longer after repeated losses) before it sends
/// again.
pub const DROP_STALL_NS: u64 = 1_000_000_000;

/// Whether a class whose last packet drop was at `last_drop_ns` may still be
/// stalled by it at `now_ns`.
pub fn stalled_by_drops(last_drop_ns: Option<u64>, now_ns: u64) -> bool {
    last_drop_ns.is_some_and(|t| now_ns.saturating_sub(t) < DROP_STALL_NS)
}

/// Demand with hysteresis: a class is taken to want less only once its
/// estimate said so for `hold_ns` without interruption; it is greedy again
/// at once. `since` keeps when the current run of "wants less" began.
pub fn held_demand(
    estimate: Option<u64>,
    since: &mut Option<u64>,
    now_ns: u64,
    hold_ns: u64,
) -> Option<u64> {
    match estimate {
        None => {
            *since = None;
            None
        }
        Some(d) => {
            let start = *since.get_or_insert(now_ns);
            if now_ns.saturating_sub(start) >= hold_ns {
                Some(d)
            } else {
                None
            }
        }
    }
}

/// Exponentially weighted rate: `prev` moved towards `sample` with time
/// constant `tau_ns`.
pub fn ewma(prev: f64, sample: f64, dt_ns: u64, tau_ns: u64) -> f64 {
    if tau_ns == 0 {
        return sample;
    }
    let a = 1.0 - (-(dt_ns as f64) / tau_ns as f64).exp();
    prev + a * (sample - prev)
}

/// Flows (in 1/1024) a class's allocation is split over: the weights
/// (1/1024 each, `qos_common::policy::activity_weight`) of those
/// acknowledged during the last activity epoch (an idle connection does not
/// count, one using a fraction of its rate counts that fraction), at most
/// the flows open now, at least one.
pub fn active_flows(activity_last_epoch: u64, open: u64) -> u64 {
    let n = if open > 0 {
        activity_last_epoch.min(open.saturating_mul(UNIT))
    } else {
        activity_last_epoch
    };
    n.max(UNIT)
}

/// Refusal of a guarantee that does not fit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "admission refused: guarantees would total {} on {iface} but its capacity is {} ({} \
     already guaranteed, default class included, + {} requested)",
    fmt(*total), fmt(*capacity), fmt(*existing), fmt(*requested)
)]
pub struct AdmissionError {
    pub iface: String,
    pub capacity: u64,
    pub existing: u64,
    pub requested: u64,
    pub total: u64,
}

fn fmt(bits: u64) -> String {
    qos_core::units::format_bits_exact(bits)
}

/// Admission control: the guarantees (including the default class's) may not
/// exceed the capacity. `others` excludes the class being (re)configured;
/// `iface` names the interface and direction in the error.
pub fn admit(
    iface: &str,
    capacity_bits: u64,
    others_bits: impl IntoIterator<Item = u64>,
    requested_bits: u64,
) -> Result<(), AdmissionError> {
    let existing: u64 = others_bits.into_iter().fold(0, u64::saturating_add);
    let total = existing.saturating_add(requested_bits);
    if total > capacity_bits {
        return Err(AdmissionError {
            iface: iface.into(),
            capacity: capacity_bits,
            existing,
            requested: requested_bits,
            total,
        });
    }
    Ok(())
}

/// Shaper-wide tuning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Own bucket depth, in time at the guarantee.
    pub depth_ns: u64,
    /// Floor of the own bucket, so that one GSO aggregate (up to 64 KB) of
    /// a small class is not a deep debt; 16 KB measured no fairer (README,
    /// "A shallower bucket for small classes").
    pub min_depth: u64,
    /// Pool depth, in time at the capacity.
    pub pool_ns: u64,
    pub min_pool: u64,
    /// Pacing gains (1/1024; ki per second) at round trips up to 30 ms;
    /// each class's are sized from them at every step
    /// (`qos_common::policy::class_gains`).
    pub pacing_kp: u64,
    pub pacing_ki: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            depth_ns: 20_000_000,
            min_depth: 64 * 1024,
            pool_ns: 10_000_000,
            min_pool: 128 * 1024,
            pacing_kp: 3 * UNIT / 4,
            pacing_ki: 5 * UNIT,
        }
    }
}

fn bytes_in(rate: u64, ns: u64) -> u64 {
    (rate.min(MAX_RATE) as u128 * ns as u128 / 1_000_000_000) as u64
}

/// Whether half an upstream buffer of `buffer` bytes takes less than the
/// shortest queue time received flows' windows are sized for
/// (`qos_common::policy::SHARED_QUEUE_MIN_US`) at `capacity` (wire
/// bytes/s): the windows then add up to more than that half.
pub fn queue_floor_exceeds_half_buffer(capacity: u64, buffer: u64) -> bool {
    bytes_in(capacity, qos_common::policy::SHARED_QUEUE_MIN_US * 1000) > buffer / 2
}

/// Host-wide datapath parameters. `upstream_buffer`: bytes of the buffer
/// received traffic queues in upstream (the switch port); windows without
/// ACK pacing add up to half of it (`NetGlobal::shared_queue_us`).
pub fn global_params(
    capacity: u64,
    shaped_ifindex: u32,
    upstream_buffer: u64,
    t: &Tuning,
) -> NetGlobal {
    let pool_depth = bytes_in(capacity, t.pool_ns).max(t.min_pool);
    NetGlobal {
        shared_queue_us: qos_common::policy::shared_queue_us(upstream_buffer / 2, capacity),
        capacity,
        pool_depth,
        prio_step: pool_depth / 16,
        extra_watermark: pool_depth / 2,
        generation: 0,
        epoch: 0,
        shaped_ifindex,
        flags: 0,
    }
}

/// A class's use per flow, weighted by use, bytes/s: Σ use² / Σ use over
/// its flows' counts in its last activity epochs (`use_sum`,
/// `use_squares`, in `USE_UNIT_BYTES`; see `ClassCounters`), 0 for none. The most a
/// flow's use is weighed against (`ClassConfig::flow_even`): the bulk
/// flows' use when light flows run beside them, every flow's when they are
/// equal. Against the class's plain average instead, light flows drag it
/// down to their own use and count in full: one bulk flow beside twenty
/// connections each using a two-hundredth of the class would be paced at a
/// twentieth of it.
pub fn flow_even(use_sum: u64, use_squares: u64) -> u64 {
    use_squares
        .checked_div(use_sum)
        .map_or(0, |units| units.saturating_mul(USE_UNIT_BYTES))
}

/// Datapath parameters of one class. `alloc` is guarantee + borrow share,
/// `flows` the flows (1/1024) it is split over, `flow_even` see
/// [`flow_even`] (0: each flow is weighed against its own rate).
pub fn class_params(
    guarantee: u64,
    ceil: u64,
    priority: u32,
    borrow_rate: u64,
    flows: u64,
    flow_even: u64,
    t: &Tuning,
) -> ClassConfig {
    let alloc = guarantee.saturating_add(borrow_rate);
    // Sized by what the class sends, not only by its guarantee: a class that
    // borrows five times its guarantee must not see one out-of-profile GSO
    // packet as a deep debt.
    let depth = bytes_in(alloc, t.depth_ns).max(t.min_depth);
    ClassConfig {
        guarantee,
        ceil,
        borrow_rate,
        flow_base: (alloc as u128 * UNIT as u128 / flows.max(UNIT) as u128) as u64,
        flow_even,
        pacing_kp: t.pacing_kp,
        pacing_ki: t.pacing_ki,
        alloc,
        depth,
        borrow_depth: bytes_in(borrow_rate, t.pool_ns).max(t.min_depth / 2),
        // Deep enough to absorb pacing noise of a class held at its ceiling.
        ceil_depth: bytes_in(ceil, 5 * t.pool_ns).max(t.min_depth),
        mark_debt: depth / 4,
        drop_debt: (2 * depth).max(2 * t.min_depth),
        window_mult: 0,
        priority,
        active: 1,
    }
}

/// Whether a new parameter set differs enough from the one in the datapath
/// to be worth a map write (1 %).
pub fn worth_update(old: &ClassConfig, new: &ClassConfig) -> bool {
    fn moved(a: u64, b: u64) -> bool {
        a.abs_diff(b) > b / 100
    }
    old.guarantee != new.guarantee
        || moved(old.ceil, new.ceil)
        || moved(old.window_mult, new.window_mult)
        || old.priority != new.priority
        || old.active != new.active
        || moved(old.borrow_rate, new.borrow_rate)
        || moved(old.flow_base, new.flow_base)
        || moved(old.pacing_kp, new.pacing_kp)
        || moved(old.pacing_ki, new.pacing_ki)
        // It only weighs flows and moves once per activity epoch: a write
        // when it moves by an eighth.
        || old.flow_even.abs_diff(new.flow_even) > new.flow_even / 8
        || moved(old.alloc, new.alloc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: u64 = 125_000; // 1 mbit in bytes/s

    fn c(g: u64, prio: u32, demand: Option<u64>) -> ClassDemand {
        ClassDemand {
            guarantee: g * M,
            ceil: 1000 * M,
            priority: prio,
            demand: demand.map(|d| d * M),
        }
    }

    fn mbit(v: &[u64]) -> Vec<u64> {
        v.iter().map(|x| (x + M / 2) / M).collect()
    }

    #[test]
    fn all_busy_at_full_guarantees_leaves_nothing_to_share() {
        let cs = [c(100, 0, None), c(300, 0, None), c(600, 0, None)];
        assert_eq!(share_spare(1000 * M, &cs), vec![0, 0, 0]);
    }

    #[test]
    fn an_idle_class_leaves_its_guarantee_to_the_others_in_proportion() {
        let cs = [c(100, 0, None), c(300, 0, None), c(600, 0, Some(0))];
        assert_eq!(mbit(&share_spare(1000 * M, &cs)), vec![150, 450, 0]);
    }

    #[test]
    fn higher_priority_takes_the_spare_first() {
        let cs = [c(100, 0, None), c(300, 1, None), c(600, 0, Some(0))];
        let mut cs = cs;
        cs[0].ceil = 500 * M; // priority 0 wants at most 400 extra
        assert_eq!(mbit(&share_spare(1000 * M, &cs)), vec![400, 200, 0]);
    }

    #[test]
    fn ceilings_and_demands_cap_shares_and_the_rest_is_redistributed() {
        let mut cs = [c(100, 0, None), c(100, 0, None), c(100, 0, Some(150))];
        cs[0].ceil = 150 * M;
        // spare 700: class 2 wants 50, class 0 may take 50, class 1 the rest.
        assert_eq!(mbit(&share_spare(1000 * M, &cs)), vec![50, 600, 50]);
    }

    #[test]
    fn unallocated_capacity_is_shared_too() {
        let cs = [c(100, 0, None), c(200, 0, None)];
        assert_eq!(mbit(&share_spare(1000 * M, &cs)), vec![233, 467]);
    }

    #[test]
    fn demand_below_guarantee_frees_the_difference() {
        let cs = [c(500, 0, Some(100)), c(500, 0, None)];
        assert_eq!(mbit(&share_spare(1000 * M, &cs)), vec![0, 400]);
    }

    #[test]
    fn demand_estimation() {
        let busy = Observation {
            rate: 95.0,
            alloc: 100,
            bytes: 1000,
            fill: 1.0,
            ..Default::default()
        };
        assert_eq!(estimate_demand(&busy), None);
        let light = Observation {
            rate: 40.0,
            alloc: 100,
            bytes: 1000,
            fill: 0.9,
            ..Default::default()
        };
        assert_eq!(estimate_demand(&light), Some(51));
        let draining = Observation { fill: 0.2, ..light };
        assert_eq!(estimate_demand(&draining), None);
        let dropped = Observation {
            dropped_bytes: 1,
            ..light
        };
        assert_eq!(estimate_demand(&dropped), None);
        let over = Observation {
            over_bytes: 100,
            ..light
        };
        assert_eq!(estimate_demand(&over), None);
        let idle = Observation {
            alloc: 100,
            fill: 1.0,
            ..Default::default()
        };
        assert_eq!(estimate_demand(&idle), Some(1));
    }

    #[test]
    fn unheld_traffic_counts_from_an_eighth_of_the_rate_and_a_hundredth_of_the_capacity() {
        let cap = 125_000_000; // 1 Gbit/s
        assert!(receives_unheld(1_250_000.0, 9_000_000.0, cap));
        assert!(!receives_unheld(1_250_000.0, 10_000_000.0, cap));
        assert!(!receives_unheld(1_249_999.0, 1_250_000.0, cap));
        assert!(!receives_unheld(0.0, 0.0, cap));
        assert!(receives_unheld(60_000_000.0, 62_000_000.0, cap));
    }

    #[test]
    fn a_held_class_gets_its_allocation_as_ceiling_where_lower() {
        assert_eq!(datapath_ceil(800, 500, true, false), 500);
        assert_eq!(datapath_ceil(400, 500, true, false), 400);
        assert_eq!(datapath_ceil(800, 500, false, false), 800);
        assert_eq!(datapath_ceil(800, 0, true, false), 1);
        // Steered by its windows: a backstop 1/4 above the allocation,
        // never above the configured ceiling.
        assert_eq!(datapath_ceil(800, 512, true, true), 640);
        assert_eq!(datapath_ceil(520, 512, true, true), 520);
        assert_eq!(datapath_ceil(800, 512, false, true), 800);
        assert_eq!(datapath_ceil(800, 0, true, true), 1);
        assert_eq!(datapath_ceil(u64::MAX, u64::MAX, true, true), u64::MAX);
    }

    /// Steps [`held_window_mult`] for a TCP class beside a UDP sender that
    /// keeps `udp_queued` bytes in the queue upstream: the link (1050) is
    /// split in proportion to what each keeps there, the TCP class's part
    /// being its windows (`window` at a multiplier of 1). Returns the TCP
    /// class's smoothed rate and the loop's integral after `secs`.
    fn run_held_loop(window: f64, udp_queued: f64, secs: f64) -> (f64, f64) {
        let (mut rate, mut integral, mut applied) = (0.0, 1.0, 1.0);
        for _ in 0..(secs * 100.0) as usize {
            let queued = window * applied;
            let got = 1050.0 * queued / (queued + udp_queued);
            rate = ewma(rate, got, 10_000_000, 50_000_000);
            let m = held_window_mult(integral, rate, 500.0, 10_000_000);
            assert!(
                (HELD_WINDOW_MULT_MIN..=WINDOW_MULT_MAX).contains(&m.applied),
                "{m:?}"
            );
            integral = m.integral;
            applied = m.applied;
        }
        (rate, integral)
    }

    #[test]
    fn a_held_class_is_steered_to_its_allocation_by_its_windows() {
        // Whatever the UDP sender keeps queued, within what the bounds
        // reach: its windows at 1 took 0.43-4.5 x the allocation. Below
        // the classes' loop's bound of 0.5 too (a short queue upstream).
        for udp_queued in [10.0, 20.0, 30.0, 40.0, 64.0, 100.0, 150.0, 250.0] {
            let (rate, integral) = run_held_loop(64.0, udp_queued, 3.0);
            assert!((rate / 500.0 - 1.0).abs() < 0.01, "{udp_queued}: {rate}");
            assert!(
                (integral - udp_queued / 64.0 * 500.0 / 550.0).abs() < 0.05,
                "{integral}"
            );
        }
        // Beyond them: at the bound, not past it.
        let (rate, integral) = run_held_loop(64.0, 1000.0, 3.0);
        assert_eq!(integral, WINDOW_MULT_MAX);
        assert!(rate < 500.0, "{rate}");
        let (rate, integral) = run_held_loop(64.0, 5.0, 3.0);
        assert!(
            (integral - HELD_WINDOW_MULT_MIN).abs() < 1e-12,
            "{integral}"
        );
        assert!(rate > 500.0, "{rate}");
    }

    #[test]
    fn a_ceiling_binds_a_class_given_all_of_it_below_the_capacity() {
        assert!(ceiling_binds(500, 500, 1000));
        assert!(ceiling_binds(501, 500, 1000));
        assert!(!ceiling_binds(499, 500, 1000));
        // No ceiling of its own: the capacity does not count as one.
        assert!(!ceiling_binds(1000, 1000, 1000));
        assert!(!ceiling_binds(0, 0, 0));
    }

    #[test]
    fn a_class_at_its_ceiling_is_steered_just_under_it_by_its_windows() {
        // The priority scenario: a 500 ceiling on a link 5 % faster than
        // the capacity, the other class's windows taking the rest of the
        // queue (`other` bytes of it, whatever it is).
        for other in [16.0, 64.0, 128.0, 250.0] {
            let (mut rate, mut integral, mut applied) = (0.0, 1.0, 1.0);
            for _ in 0..300 {
                let queued = 64.0 * applied;
                let got = 1050.0 * queued / (queued + other);
                rate = ewma(rate, got, 10_000_000, 50_000_000);
                let m = ceiling_window_mult(integral, rate, 500.0, false, 10_000_000);
                assert!(
                    (HELD_WINDOW_MULT_MIN..=WINDOW_MULT_MAX).contains(&m.applied),
                    "{m:?}"
                );
                integral = m.integral;
                applied = m.applied;
            }
            assert!(
                (rate / (CEIL_RATE_TARGET * 500.0) - 1.0).abs() < 0.01,
                "{other}: {rate}"
            );
        }
        // Nothing measured: the integral kept.
        let m = ceiling_window_mult(0.7, 0.0, 500.0, false, 10_000_000);
        assert_eq!((m.integral, m.applied), (0.7, 0.7));
    }

    #[test]
    fn a_class_its_ceiling_polices_is_brought_under_it_at_once() {
        // Its windows would take 1.1 x the ceiling; the bucket passes the
        // ceiling and polices the rest, so the rate says only "at it".
        let steps_over = |policed_known: bool| {
            let (mut rate, mut integral, mut applied): (f64, f64, f64) = (500.0, 1.0, 1.0);
            let mut over = 0;
            for _ in 0..200 {
                let wants = 550.0 * applied;
                rate = ewma(rate, wants.min(500.0), 10_000_000, 50_000_000);
                let policed = policed_known && wants > 500.0;
                over += usize::from(wants > 500.0);
                let m = ceiling_window_mult(integral, rate, 500.0, policed, 10_000_000);
                integral = m.integral;
                applied = m.applied;
            }
            (over, 550.0 * applied)
        };
        let (over, end) = steps_over(true);
        assert!(over <= 3, "{over} steps over the ceiling");
        assert!(
            (end / (CEIL_RATE_TARGET * 500.0) - 1.0).abs() < 0.01,
            "{end}"
        );
        // Without the bucket's word: over it for most of a second.
        let (over, _) = steps_over(false);
        assert!(over > 50, "{over}");
    }

    #[test]
    fn a_policed_class_backs_off_even_with_nothing_measured() {
        let m = ceiling_window_mult(0.7, 0.0, 500.0, true, 10_000_000);
        let backed_off = 0.7 * CEIL_POLICED_BACKOFF;
        assert_eq!((m.integral, m.applied), (backed_off, backed_off));
        // Not below WINDOW_MULT_MIN by backing off, nor raised to it.
        let m = ceiling_window_mult(WINDOW_MULT_MIN, 0.0, 500.0, true, 10_000_000);
        assert_eq!(m.integral, WINDOW_MULT_MIN);
        let m = ceiling_window_mult(0.3, 0.0, 500.0, true, 10_000_000);
        assert_eq!(m.integral, 0.3);
    }

    #[test]
    fn a_class_at_its_ceiling_keeps_its_windows_while_not_steered() {
        assert_eq!(
            window_mult_kept(0.8),
            WindowMult {
                integral: 0.8,
                applied: 0.8
            }
        );
        let low = window_mult_kept(0.01);
        assert_eq!((low.integral, low.applied), (0.01, HELD_WINDOW_MULT_MIN));
        let high = window_mult_kept(9.0);
        assert_eq!((high.integral, high.applied), (9.0, WINDOW_MULT_MAX));
    }

    #[test]
    fn a_held_class_at_its_ceiling_is_steered_under_it() {
        assert_eq!(held_target(500, 1000, false), 500.0);
        assert_eq!(held_target(500, 500, true), CEIL_RATE_TARGET * 500.0);
        // An allocation under the ceiling's target (the allocator's view
        // lags): the allocation.
        assert_eq!(held_target(400, 500, true), 400.0);
    }

    #[test]
    fn a_held_class_resumes_at_its_steered_windows_after_a_stall() {
        let ms = 1_000_000;
        // Steered lately: its integral, within the bounds, unchanged.
        let m = held_window_rest(0.2, Some(1_000 * ms), 1_300 * ms);
        assert_eq!((m.integral, m.applied), (0.2, 0.2));
        let m = held_window_rest(0.01, Some(1_000 * ms), 1_999 * ms);
        assert_eq!((m.integral, m.applied), (0.01, HELD_WINDOW_MULT_MIN));
        // Never steered, or not for HELD_STEER_KEPT_NS: a start's windows.
        let start = HELD_WINDOW_MULT as f64 / UNIT as f64;
        for last in [None, Some(1_000 * ms)] {
            let m = held_window_rest(0.2, last, 1_000 * ms + HELD_STEER_KEPT_NS);
            assert_eq!((m.integral, m.applied), (0.2, start), "{last:?}");
        }
        // A clock that went back counts as now.
        let m = held_window_rest(0.3, Some(5_000 * ms), 1_000 * ms);
        assert_eq!(m.applied, 0.3);
    }

    #[test]
    fn a_class_whose_unheld_traffic_starts_is_not_lent_out() {
        let s = 1_000_000_000;
        assert!(!unheld_traffic_starting(None, 10 * s));
        assert!(unheld_traffic_starting(Some(10 * s), 10 * s));
        assert!(unheld_traffic_starting(
            Some(10 * s),
            10 * s + UNHELD_START_NS - 1
        ));
        assert!(!unheld_traffic_starting(
            Some(10 * s),
            10 * s + UNHELD_START_NS
        ));
        assert!(unheld_traffic_starting(Some(10 * s), s));
    }

    #[test]
    fn a_class_from_afar_is_idle_after_its_round_trip() {
        let step = 10_000_000;
        assert_eq!(silent_steps(0, step), SILENT_STEPS_MIN);
        assert_eq!(silent_steps(100, step), SILENT_STEPS_MIN);
        assert_eq!(silent_steps(20_000, step), 3);
        assert_eq!(silent_steps(20_001, step), 4);
        assert_eq!(silent_steps(60_000, step), 7);
        assert_eq!(silent_steps(u64::MAX, step), 51);
        assert_eq!(silent_steps(60_000, 0), 70_000_000);
        assert_eq!(silent_steps(60_000, 1_000_000), 70);
    }

    #[test]
    fn a_waking_class_keeps_its_share_for_sixteen_round_trips() {
        let s = 1_000_000_000;
        let hold = 100_000_000;
        let wake = |woke, now, rtt| waking(woke, now, rtt, hold);
        // 60 ms away: 960 ms.
        assert!(wake(Some(10 * s), 10 * s, 60_000));
        assert!(wake(Some(10 * s), 10 * s + 959_999_999, 60_000));
        assert!(!wake(Some(10 * s), 10 * s + 960_000_000, 60_000));
        // Not woken since its last silence: nothing to keep.
        assert!(!wake(None, 10 * s, 60_000));
        // Far away: at most two seconds.
        assert!(wake(Some(10 * s), 12 * s - 1, 500_000));
        assert!(!wake(Some(10 * s), 12 * s, 500_000));
        assert!(!wake(Some(10 * s), 12 * s, u64::MAX));
        // Near or unmeasured: the hold.
        assert!(wake(Some(10 * s), 10 * s + hold - 1, 6_000));
        assert!(!wake(Some(10 * s), 10 * s + hold, 6_000));
        assert!(!wake(Some(10 * s), 10 * s + hold, 0));
        assert!(wake(Some(10 * s), 10 * s + hold, 6_251));
        // A clock that went backwards counts as just woken.
        assert!(wake(Some(10 * s), s, 60_000));
        // It wakes with an eighth of its guarantee in a step, not with a
        // trickle; without a guarantee, with any traffic.
        let g = 250_000;
        assert!(wakes_with(g as f64 / WAKE_MIN_SHARE, g));
        assert!(!wakes_with(g as f64 / WAKE_MIN_SHARE * 0.99, g));
        assert!(!wakes_with(0.0, g));
        assert!(wakes_with(1.0, 0));
        assert!(!wakes_with(0.0, 0));
        // Only from afar do the others hand its share back gradually.
        assert!(wakes_from_afar(60_000, hold));
        assert!(wakes_from_afar(6_251, hold));
        assert!(!wakes_from_afar(6_250, hold));
        assert!(!wakes_from_afar(0, hold));
        assert!(!wakes_from_afar(u64::MAX, WAKE_MAX_NS));
    }

    #[test]
    fn borrowers_hand_a_waking_class_its_share_back_as_its_rate_grows() {
        let cap = 20 * M;
        // a (2) wakes beside b (6) borrowing c's idle 12 of 20.
        let cs = [c(2, 0, None), c(6, 0, None), c(12, 0, Some(0))];
        let none = [None, None, None];
        assert_eq!(
            share_spare_waking(cap, &cs, &none),
            share_spare(cap, &cs),
            "nothing waking: as share_spare"
        );
        assert_eq!(mbit(&share_spare(cap, &cs)), vec![3, 9, 0]);
        // Its rate says 1: it keeps its share (2 + 3); b borrows all that
        // a and c leave (6 + 13): 24 allocated of 20 meanwhile.
        let waking = [Some(Some(M)), None, None];
        assert_eq!(mbit(&share_spare_waking(cap, &cs, &waking)), vec![3, 13, 0]);
        // Its rate says 4: b keeps 1 of the 4 it borrowed from a's share.
        let waking = [Some(Some(4 * M)), None, None];
        assert_eq!(mbit(&share_spare_waking(cap, &cs, &waking)), vec![3, 10, 0]);
        // Its rate says it wants all it gets: as share_spare.
        let waking = [Some(None), None, None];
        assert_eq!(mbit(&share_spare_waking(cap, &cs, &waking)), vec![3, 9, 0]);
        // c wakes (its rate says 4 of its guarantee 12) while a and b borrow
        // its share: c keeps its guarantee, a and b 8 of its 12 between them.
        let cs = [c(2, 0, None), c(6, 0, None), c(12, 0, None)];
        assert_eq!(mbit(&share_spare(cap, &cs)), vec![0, 0, 0]);
        let waking = [None, None, Some(Some(4 * M))];
        assert_eq!(mbit(&share_spare_waking(cap, &cs, &waking)), vec![2, 6, 0]);
    }

    #[test]
    fn a_held_class_with_nothing_measured_keeps_its_integral() {
        let m = held_window_mult(2.0, 0.0, 500.0, 10_000_000);
        assert_eq!((m.integral, m.applied), (2.0, 2.0));
        let m = held_window_mult(9.0, 100.0, 0.0, 10_000_000);
        assert_eq!((m.integral, m.applied), (9.0, WINDOW_MULT_MAX));
        // A step longer than 100 ms counts as 100 ms; the error as ln 2.
        let long = held_window_mult(1.0, 1.0, 500.0, 10_000_000_000);
        let capped = held_window_mult(1.0, 250.0, 500.0, 100_000_000);
        assert_eq!(long, capped);
        assert!((capped.integral - (WINDOW_LOOP_KI * 0.1 * LN_2).exp()).abs() < 1e-12);
    }

    fn window_class(alloc: f64, rate: f64, mult: f64) -> WindowClass {
        WindowClass {
            alloc,
            rate,
            mult,
            steered: true,
            wants_less: false,
        }
    }

    /// Steps the window loop against a link that splits `link` bytes/s in
    /// proportion to each class's allocation × multiplier × `bias` (how
    /// much its windows take per byte of window), every 10 ms for `secs`,
    /// the rates smoothed as the shaper smooths them (50 ms).
    fn run_window_loop(allocs: &[f64], biases: &[f64], link: f64, secs: f64) -> Vec<WindowClass> {
        let mut cs: Vec<WindowClass> = allocs.iter().map(|a| window_class(*a, 0.0, 1.0)).collect();
        let mut applied = vec![1.0; cs.len()];
        for _ in 0..(secs * 100.0) as usize {
            let weights: Vec<f64> = cs
                .iter()
                .zip(biases)
                .zip(&applied)
                .map(|((c, b), m)| c.alloc * b * m)
                .collect();
            let total: f64 = weights.iter().sum();
            for (c, w) in cs.iter_mut().zip(&weights) {
                c.rate = ewma(c.rate, link * w / total, 10_000_000, 50_000_000);
            }
            let next = window_mults(&cs, 10_000_000);
            for ((c, m), n) in cs.iter_mut().zip(applied.iter_mut()).zip(next) {
                c.mult = n.integral;
                *m = n.applied;
            }
        }
        cs
    }

    #[test]
    fn the_window_loop_brings_every_class_to_the_same_share_of_the_link() {
        // all-busy's 100 / 300 / 600 on a link 5 % faster than the
        // capacity, the largest class's windows taking 30 % more per byte.
        let cs = run_window_loop(&[100.0, 300.0, 600.0], &[1.0, 0.9, 1.3], 1050.0, 3.0);
        for c in &cs {
            assert!((c.rate / c.alloc - 1.05).abs() < 0.005, "{cs:?}");
        }
        // The integrals' geometric mean, weighed by allocation, is 1.
        let mean: f64 = cs.iter().map(|c| c.alloc * c.mult.ln()).sum::<f64>() / 1000.0;
        assert!(mean.abs() < 1e-9, "{mean}");
    }

    #[test]
    fn the_window_loop_leaves_lone_idle_and_excluded_classes_at_one() {
        let neutral = WindowMult {
            integral: 1.0,
            applied: 1.0,
        };
        // One steered class has nothing to be weighed against.
        let lone = [
            window_class(100.0, 50.0, 2.0),
            WindowClass {
                steered: false,
                ..window_class(100.0, 0.0, 3.0)
            },
        ];
        assert_eq!(window_mults(&lone, 10_000_000), vec![neutral; 2]);
        // No bytes yet.
        let silent = [window_class(100.0, 0.0, 2.0), window_class(100.0, 0.0, 2.0)];
        assert_eq!(window_mults(&silent, 10_000_000), vec![neutral; 2]);
        // A class left out of the loop is sized at 1 while the others move.
        let mixed = [
            window_class(100.0, 80.0, 1.0),
            window_class(100.0, 120.0, 1.0),
            WindowClass {
                steered: false,
                ..window_class(100.0, 500.0, 3.0)
            },
        ];
        let m = window_mults(&mixed, 10_000_000);
        assert_eq!(m[2], neutral);
        assert!(m[0].applied > 1.0 && m[1].applied < 1.0, "{m:?}");
        assert!(m[0].integral > 1.0 && m[1].integral < 1.0, "{m:?}");
    }

    #[test]
    fn a_class_that_looks_like_it_wants_less_is_steered_but_not_a_reference() {
        // Its windows hold it short: it rises, and the anchors' integrals
        // stay centred on 1 without it.
        let cs = [
            WindowClass {
                wants_less: true,
                ..window_class(300.0, 200.0, 1.5)
            },
            window_class(100.0, 120.0, 1.0),
            window_class(600.0, 700.0, 1.0),
        ];
        let m = window_mults(&cs, 10_000_000);
        assert!(m[0].integral > 1.5, "{m:?}");
        let mean = (100.0 * m[1].integral.ln() + 600.0 * m[2].integral.ln()) / 700.0;
        assert!(mean.abs() < 1e-9, "{m:?}");
        // Every class wanting less: all of them are the reference.
        let all: Vec<WindowClass> = cs
            .iter()
            .map(|c| WindowClass {
                wants_less: true,
                ..*c
            })
            .collect();
        let m = window_mults(&all, 10_000_000);
        let mean: f64 = all
            .iter()
            .zip(&m)
            .map(|(c, m)| c.alloc * m.integral.ln())
            .sum::<f64>()
            / 1000.0;
        assert!(mean.abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn a_class_its_windows_cannot_raise_winds_up_only_to_the_bound() {
        // Its rate does not follow its windows (a sender limited elsewhere).
        let mut cs = [
            window_class(100.0, 10.0, 1.0),
            window_class(900.0, 1040.0, 1.0),
        ];
        for _ in 0..1000 {
            let m = window_mults(&cs, 10_000_000);
            for (c, m) in cs.iter_mut().zip(&m) {
                assert!(
                    (WINDOW_MULT_MIN..=WINDOW_MULT_MAX).contains(&m.applied),
                    "{m:?}"
                );
                assert!(
                    (WINDOW_MULT_MIN..=WINDOW_MULT_MAX).contains(&m.integral),
                    "{m:?}"
                );
                c.mult = m.integral;
            }
        }
        assert_eq!(cs[0].mult, WINDOW_MULT_MAX);
        // The other is centred against it, within its bound.
        assert!(cs[1].mult >= WINDOW_MULT_MIN && cs[1].mult < 1.0, "{cs:?}");
        // A step longer than 100 ms counts as 100 ms.
        let long = window_mults(
            &[
                window_class(100.0, 50.0, 1.0),
                window_class(100.0, 150.0, 1.0),
            ],
            u64::MAX,
        );
        let capped = window_mults(
            &[
                window_class(100.0, 50.0, 1.0),
                window_class(100.0, 150.0, 1.0),
            ],
            100_000_000,
        );
        assert_eq!(long, capped);
    }

    #[test]
    fn a_class_that_dropped_counts_as_stalled_for_a_second() {
        assert!(!stalled_by_drops(None, 5_000_000_000));
        assert!(stalled_by_drops(Some(1_000_000_000), 1_000_000_000));
        assert!(stalled_by_drops(Some(1_000_000_000), 1_999_999_999));
        assert!(!stalled_by_drops(Some(1_000_000_000), 2_000_000_000));
        // A clock that went backwards (adoption) is no reason to lend.
        assert!(stalled_by_drops(Some(3_000_000_000), 2_000_000_000));
    }

    #[test]
    fn demand_needs_to_hold_before_it_counts() {
        let mut since = None;
        assert_eq!(held_demand(Some(5), &mut since, 1000, 200), None);
        assert_eq!(held_demand(Some(5), &mut since, 1100, 200), None);
        assert_eq!(held_demand(Some(6), &mut since, 1200, 200), Some(6));
        assert_eq!(held_demand(None, &mut since, 1250, 200), None);
        assert_eq!(since, None);
        assert_eq!(held_demand(Some(5), &mut since, 1300, 200), None);
    }

    #[test]
    fn ewma_moves_towards_the_sample() {
        assert_eq!(ewma(0.0, 100.0, 10, 0), 100.0);
        let v = ewma(0.0, 100.0, 50, 50);
        assert!((v - 63.2).abs() < 0.1, "{v}");
        assert!(ewma(100.0, 100.0, 5, 50) == 100.0);
    }

    #[test]
    fn active_flow_count() {
        assert_eq!(active_flows(0, 0), UNIT);
        assert_eq!(active_flows(16 * UNIT, 17), 16 * UNIT);
        assert_eq!(active_flows(20 * UNIT, 16), 16 * UNIT);
        assert_eq!(active_flows(3 * UNIT, 0), 3 * UNIT);
        // A bulk flow and a request/response flow using a tenth of its rate.
        assert_eq!(active_flows(UNIT + 102, 2), UNIT + 102);
        // Flows using little do not take the class below one flow.
        assert_eq!(active_flows(300, 3), UNIT);
        assert_eq!(active_flows(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn admission_names_the_numbers() {
        assert!(admit("veth0", 1000, [100, 300], 600).is_ok());
        let e = admit("veth0", 1000, [100, 300], 700).expect_err("over");
        assert_eq!(
            (e.existing, e.requested, e.total, e.capacity),
            (400, 700, 1100, 1000)
        );
        let msg = e.to_string();
        assert!(
            msg.contains("1100bit") && msg.contains("veth0") && msg.contains("capacity is 1kbit"),
            "{msg}"
        );
    }

    #[test]
    fn flows_are_weighed_against_the_class_use_per_flow_weighted_by_use() {
        let sums = |uses: &[u64]| {
            (
                uses.iter().sum::<u64>(),
                uses.iter().map(|u| u * u).sum::<u64>(),
            )
        };
        // Five equal flows at 1000 units: their use.
        let (sum, sq) = sums(&[1000; 5]);
        assert_eq!(flow_even(sum, sq), 1000 * USE_UNIT_BYTES);
        // A bulk flow at 900 beside twenty light ones at 5: about the bulk
        // flow's use (a plain average would be 48).
        let mut uses = vec![900];
        uses.extend([5; 20]);
        let (sum, sq) = sums(&uses);
        assert_eq!(flow_even(sum, sq), 810 * USE_UNIT_BYTES);
        // Nothing counted: none (each flow's own rate).
        assert_eq!(flow_even(0, 0), 0);
        assert_eq!(flow_even(0, 5), 0);
        assert_eq!(flow_even(1, u64::MAX), u64::MAX);
    }

    #[test]
    fn class_parameters_scale_with_rates() {
        let t = Tuning::default();
        let p = class_params(100 * M, 1000 * M, 2, 50 * M, 3 * UNIT, 30 * M, &t);
        assert_eq!(p.alloc, 150 * M);
        assert_eq!(p.flow_base, 50 * M);
        assert_eq!(p.flow_even, 30 * M);
        assert_eq!(p.depth, 375_000); // 20 ms at 150 mbit (guarantee + share)
        assert_eq!(p.mark_debt, p.depth / 4);
        assert!(p.drop_debt > p.mark_debt);
        let small = class_params(M, M, 0, 0, 0, 0, &t);
        assert_eq!(small.depth, t.min_depth);
        assert_eq!(small.flow_base, M);
        assert_eq!(small.flow_even, 0);
        let g = global_params(1000 * M, 7, 256 * 1024, &t);
        assert_eq!(g.pool_depth, 1_250_000);
        assert_eq!(g.shaped_ifindex, 7);
        assert_eq!(g.shared_queue_us, 1_048); // 128 KB at 1 Gbit/s
        // The 100 µs floor holds 12.5 KB at 1 Gbit/s, 125 KB at 10.
        assert!(!queue_floor_exceeds_half_buffer(1000 * M, 64 * 1024));
        assert!(queue_floor_exceeds_half_buffer(1000 * M, 16 * 1024));
        assert!(queue_floor_exceeds_half_buffer(10_000 * M, 64 * 1024));
        assert!(!queue_floor_exceeds_half_buffer(10_000 * M, 256 * 1024));
        assert!(worth_update(
            &p,
            &ClassConfig {
                borrow_rate: 52 * M,
                ..p
            }
        ));
        assert!(!worth_update(
            &p,
            &ClassConfig {
                flow_base: 50 * M + 1000,
                ..p
            }
        ));
        // flow_even (30 M) is rewritten when it moves by an eighth.
        let with_even = |flow_even| ClassConfig { flow_even, ..p };
        assert!(worth_update(&p, &with_even(25 * M)));
        assert!(!worth_update(&p, &with_even(28 * M)));
    }

    fn arb_class() -> impl Strategy<Value = ClassDemand> {
        (
            1u64..500,
            0u32..=7,
            prop::option::of(0u64..2000),
            0u64..1000,
        )
            .prop_map(|(g, p, d, extra_ceil)| ClassDemand {
                guarantee: g * M,
                ceil: (g + extra_ceil) * M,
                priority: p,
                demand: d.map(|d| d * M),
            })
    }

    proptest! {
        /// Biases within a factor of 1.9 of each other: the largest class
        /// stays near 1, so the smallest may have to go down to 0.53, and
        /// multipliers go no lower than 0.5.
        #[test]
        fn the_window_loop_evens_out_any_bias(
            allocs in prop::collection::vec(10.0f64..600.0, 2..6),
            biases in prop::collection::vec(0.75f64..1.4, 6),
        ) {
            let link = allocs.iter().sum::<f64>() * 1.05;
            let cs = run_window_loop(&allocs, &biases[..allocs.len()], link, 4.0);
            for c in &cs {
                let ratio = c.rate / c.alloc;
                prop_assert!((ratio - 1.05).abs() < 0.01, "ratio {}", ratio);
            }
        }

        #[test]
        fn sharing_respects_capacity_ceilings_and_priority(cs in prop::collection::vec(arb_class(), 1..12)) {
            let capacity = cs.iter().map(|c| c.guarantee).sum::<u64>() + 500 * M;
            let extra = share_spare(capacity, &cs);
            let used: u64 = cs.iter().map(|c| c.guarantee.min(c.demand.unwrap_or(u64::MAX))).sum();
            prop_assert!(extra.iter().sum::<u64>() <= capacity - used);
            for (c, e) in cs.iter().zip(&extra) {
                prop_assert!(c.guarantee + e <= c.wanted_total().max(c.guarantee));
            }
            // A lower priority only gets something if every higher priority
            // class that wanted more got all it wanted.
            for (i, ci) in cs.iter().enumerate() {
                if extra[i] == 0 { continue; }
                for (j, cj) in cs.iter().enumerate() {
                    if cj.priority < ci.priority {
                        prop_assert_eq!(cj.guarantee + extra[j], cj.wanted_total().max(cj.guarantee));
                    }
                }
            }
            // Work conservation: if spare is left, nobody wants more.
            let left = capacity - used - extra.iter().sum::<u64>();
            if left > cs.len() as u64 {
                for (c, e) in cs.iter().zip(&extra) {
                    prop_assert_eq!(c.guarantee + e, c.wanted_total().max(c.guarantee));
                }
            }
        }

        #[test]
        fn equal_priority_shares_are_proportional_to_guarantees(gs in prop::collection::vec(1u64..400, 2..8)) {
            let cs: Vec<ClassDemand> = gs.iter().map(|&g| ClassDemand { guarantee: g * M, ceil: 100_000 * M, priority: 3, demand: None }).collect();
            let capacity = gs.iter().sum::<u64>() * M + 1000 * M;
            let extra = share_spare(capacity, &cs);
            let total_g: u64 = gs.iter().sum();
            for (g, e) in gs.iter().zip(&extra) {
                let expect = 1000.0 * M as f64 * *g as f64 / total_g as f64;
                prop_assert!((*e as f64 - expect).abs() <= cs.len() as f64 + 1.0, "{} vs {}", e, expect);
            }
        }
    }
}
