//! Per-packet and per-ack policy maths of the network datapath.
//!
//! Rules for this module (it is compiled for BPF too):
//! - no panics: every division goes through `checked_div`, no indexing;
//! - no signed division (BPF v3 has none): signed values are split into sign
//!   and magnitude first;
//! - products are bounded so that they fit in u64 (rates are capped at
//!   `MAX_RATE` bytes/s and refill intervals at `MAX_REFILL_NS`).

use crate::net::{ClassConfig, SOCK_WOKEN, SOCK_WOKEN_LATE};

pub const NS_PER_SEC: u64 = 1_000_000_000;
/// A bucket earns at most one second of tokens per refill.
pub const MAX_REFILL_NS: u64 = NS_PER_SEC;
/// Highest rate the datapath handles: 100 Gbit/s in bytes per second.
pub const MAX_RATE: u64 = 12_500_000_000;
/// Fixed-point unit of gains and the pacing multiplier.
pub const UNIT: u64 = 1024;
/// Bounds of the pacing multiplier (0.75 .. 4). It corrects pacing error and
/// application-limited flows; transients are the proportional term's job.
/// A start's burst is a transient too: 32 flows starting together from 60
/// ms away put their class 100 KB into debt, and with a floor of 0.5 the
/// multiplier fell to it within a second; the class then ran at 5–7 of its
/// 10 Mbit/s for 1.3 s while it climbed back (worst windows 0.40–0.49 in
/// seven runs; at 0.75, 0.67–0.72 in eight, 6.1 VM, 2026-12-07).
pub const MULT_MIN: u64 = UNIT * 3 / 4;
pub const MULT_MAX: u64 = UNIT * 4;
/// Lowest multiplier of a received flow's window ([`unpaced_window_clamp`]).
/// The loop that weighs classes against each other keeps to 0.5 (netqos
/// `WINDOW_MULT_MIN`), but a class held at its allocation beside UDP may
/// need windows far below its share of the queue upstream when the UDP
/// sender keeps that queue short (netqos `held_window_mult`).
pub const WINDOW_MULT_FLOOR: u64 = UNIT / 8;
/// Bucket fill (1/1024 of the depth) the pacing loop steers a busy class
/// to: slightly positive, so that a class sending exactly its allocation
/// pays from its own tokens instead of hovering at the out-of-profile edge.
pub const FILL_TARGET: i64 = (UNIT / 8) as i64;
/// The pacing multiplier is updated at most this often.
pub const CONTROL_INTERVAL_NS: u64 = 5_000_000;
/// A single multiplier step covers at most this much time.
pub const MAX_CONTROL_STEP_NS: u64 = 50_000_000;

#[inline(always)]
const fn min_u64(a: u64, b: u64) -> u64 {
    if a < b { a } else { b }
}

#[inline(always)]
const fn max_u64(a: u64, b: u64) -> u64 {
    if a > b { a } else { b }
}

/// Tokens (bytes) a bucket refilled at `rate` bytes/s earns in `elapsed_ns`.
#[inline(always)]
pub const fn earned(elapsed_ns: u64, rate: u64) -> u64 {
    // ≤ 1e9 * 1.25e10 = 1.25e19 < u64::MAX
    min_u64(elapsed_ns, MAX_REFILL_NS) * min_u64(rate, MAX_RATE) / NS_PER_SEC
}

/// Adjustment (≤ 0) that brings a bucket which reached `level` after a refill
/// back under its `depth`.
#[inline(always)]
pub const fn overflow_correction(level: i64, depth: u64) -> i64 {
    let depth = min_i64_of_u64(depth);
    if level > depth { depth - level } else { 0 }
}

/// Adjustment (≥ 0) that lifts a bucket which fell to `level` back to
/// `-floor`. Bounds the debt a burst of guaranteed traffic can leave in the
/// shared pool.
#[inline(always)]
pub const fn underflow_correction(level: i64, floor: u64) -> i64 {
    let floor = -min_i64_of_u64(floor);
    if level < floor { floor - level } else { 0 }
}

/// Tokens (≥ 0) to move from the borrow bucket (at `borrow`) into the own
/// bucket (at `own`) to repay its debt. Out-of-profile traffic leaves debt
/// in the own bucket, which earns only the guarantee: a class with a small
/// or no guarantee (the default class) would keep a debt for seconds or for
/// ever, and be slowed and dropped long after it came back within its
/// allocation. Repaying from the borrow allowance as well clears the debt at
/// the rate the class is allocated; the class cannot borrow meanwhile,
/// because it has already spent those bytes.
#[inline(always)]
pub const fn debt_repayment(own: i64, borrow: i64) -> i64 {
    if own >= 0 || borrow <= 0 {
        return 0;
    }
    let debt = own.unsigned_abs();
    let available = borrow.unsigned_abs();
    // Both are below 2^63 here.
    (if debt < available { debt } else { available }) as i64
}

#[inline(always)]
const fn min_i64_of_u64(v: u64) -> i64 {
    if v > i64::MAX as u64 {
        i64::MAX
    } else {
        v as i64
    }
}

/// Bytes a packet occupies on the wire (what tc and HTB charge): a GSO packet
/// carries its headers once but is sent as `gso_segs` frames.
#[inline(always)]
pub const fn wire_len(skb_len: u32, gso_segs: u32, header_len: u32) -> u64 {
    let extra = if gso_segs > 1 {
        (gso_segs as u64 - 1) * header_len as u64
    } else {
        0
    };
    skb_len as u64 + extra
}

/// Pool level a class of `priority` needs before it may borrow within its
/// allowance. Priority 0 may drain the pool; each lower priority leaves one
/// more step for the ones above it, which gives strict priority at sub-ms
/// time scales without any shared lock.
#[inline(always)]
pub const fn borrow_threshold(priority: u32, prio_step: u64) -> i64 {
    min_i64_of_u64(priority as u64 * prio_step)
}

/// Pool level a class of `priority` needs before it may borrow beyond its
/// allowance (capacity no allowance claims right now).
#[inline(always)]
pub const fn extra_threshold(priority: u32, prio_step: u64, watermark: u64) -> i64 {
    min_i64_of_u64(watermark + priority as u64 * prio_step)
}

/// Bucket levels of one class and the pool, read just before a decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Levels {
    pub own: i64,
    pub borrow: i64,
    /// Ceiling bucket; ignored when the class has no ceiling below capacity.
    pub ceil: i64,
    pub pool: i64,
}

/// What a class may do with one packet: its configuration and the kind of
/// the packet's flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub priority: u32,
    pub has_ceil: bool,
    pub prio_step: u64,
    pub extra_watermark: u64,
    pub mark_debt: u64,
    pub drop_debt: u64,
    /// What the packet's flow answers.
    pub flow: FlowKind,
}

/// What a packet's flow answers, which moves the thresholds [`decide`]
/// applies to its class's debt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKind {
    /// The packet's flow is paced by us: its sender slows down on its own,
    /// and a drop would only stall it (a local TCP sender retries a dropped
    /// packet after its probe timer, hundreds of ms). Such packets are
    /// marked only past the drop threshold and dropped only past
    /// `PACED_DROP_FACTOR` times it.
    pub paced: bool,
    /// The packet's flow answers CE marks (ECN-capable) but nothing paces
    /// it: marked from the mark threshold like any other, since marks are
    /// all that slows it, and dropped only past `PACED_DROP_FACTOR` times
    /// the drop threshold, since a receive-side drop stalls it.
    pub answers_marks: bool,
    /// The packet belongs to a received flow that its receive window holds
    /// at its share, without ACK pacing ([`unpaced_window_clamp`]): past the
    /// drop threshold it passes uncharged ([`Verdict::OverUncharged`]), and
    /// it is never marked, until its class is past its ceiling
    /// ([`Verdict::PastCeiling`]).
    /// Neither a mark nor a drop would help: CE cuts the sender's
    /// congestion window below the clamp, and a congestion window of a
    /// segment or two holds nothing on a round trip of microseconds; a drop
    /// stalls the flow. And the debt it would leave is not the flow's: the
    /// windows share the link upstream, which runs faster than the
    /// configured capacity (they all get it in proportion). The debt up to
    /// the drop threshold is what the class's pacing loop reads: a class
    /// over its share empties its bucket, one under fills it.
    pub window_bound: bool,
    /// The packet is a TCP segment without payload from a TCP socket (a
    /// pure ACK, or SYN/FIN/RST): a drop would not slow the traffic it is
    /// charged to, only the flow in the other direction (an upload's ACKs
    /// count against the uploader's ingress quota). It is charged up to the
    /// mark threshold and passes uncharged past it
    /// ([`Verdict::OverUncharged`]): never dropped, and the debt room up to
    /// the drop threshold is left to the class's data.
    pub no_payload: bool,
}

/// Largest packet that can carry no payload, from its network header: IPv4
/// and TCP headers of 60 bytes each (IPv6's fixed header is 40). Only
/// packets up to this size need their headers parsed to find out.
pub const NO_PAYLOAD_MAX_L3_LEN: u32 = 120;

/// See [`FlowKind::paced`].
pub const PACED_DROP_FACTOR: u64 = 4;

/// Outcome of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Paid from the class's own (guaranteed) tokens.
    Own,
    /// Paid from the shared pool within the class's borrow allowance.
    Borrow,
    /// Paid from the shared pool beyond the allowance: capacity nobody claims.
    BorrowExtra,
    /// Out of profile: passes, charged as debt to the own bucket.
    Over,
    /// Out of profile and the debt is past the mark threshold: passes with
    /// ECN CE set when the packet is ECN-capable.
    OverMark,
    /// Debt past the drop threshold: dropped, not charged.
    Drop,
    /// Debt past the mark threshold, but the packet has no payload
    /// ([`FlowKind::no_payload`]) or its flow's window holds it
    /// ([`FlowKind::window_bound`]): passes, charged to nothing (counted)
    /// but a window-held packet's ceiling.
    OverUncharged,
    /// A window-held packet ([`FlowKind::window_bound`]) of a class past its
    /// ceiling, whose ceiling bucket's debt is below the drop threshold:
    /// passes, charged to the ceiling and the pool, with ECN CE set when
    /// that debt is past the mark threshold and the packet is ECN-capable.
    PastCeiling { mark: bool },
    /// A window-held packet without ECN of a class past its ceiling whose
    /// ceiling debt it carries past a multiple of a quarter of the mark
    /// threshold ([`past_ceiling`]):
    /// dropped, and charged to the ceiling, so that the next packets pass
    /// until the debt grows by that much again.
    DropCharged,
}

/// Decides one packet of `len` wire bytes.
///
/// Order: own tokens; borrowing within the allowance (pool above the
/// priority threshold, ceiling not reached); borrowing of unclaimed capacity;
/// otherwise the packet is out of profile and the debt decides between pass,
/// mark and drop.
#[inline(always)]
pub const fn decide(levels: &Levels, limits: &Limits, len: u64) -> Verdict {
    if levels.own > 0 {
        return Verdict::Own;
    }
    let ceil_ok = !limits.has_ceil || levels.ceil > 0;
    if ceil_ok {
        if levels.borrow > 0 && levels.pool > borrow_threshold(limits.priority, limits.prio_step) {
            return Verdict::Borrow;
        }
        if levels.pool > extra_threshold(limits.priority, limits.prio_step, limits.extra_watermark)
        {
            return Verdict::BorrowExtra;
        }
    }
    let flow = limits.flow;
    // A packet without payload of a window-held flow (an ACK its socket
    // receives for what it sends) is never dropped, past the ceiling
    // either: that would slow the other direction only.
    if flow.window_bound && !flow.no_payload && !ceil_ok {
        return past_ceiling(levels.ceil, limits, len);
    }
    // own ≤ 0 here: the debt after this packet is len + |own|.
    let debt = len.saturating_add(levels.own.unsigned_abs());
    // A paced flow is slowed by its pacing; CE would also cut its window and
    // make it undershoot. It is marked only where others would be dropped.
    let mark_at = if flow.paced || flow.window_bound {
        limits.drop_debt
    } else {
        limits.mark_debt
    };
    let drop_at = if flow.paced || flow.answers_marks {
        limits.drop_debt.saturating_mul(PACED_DROP_FACTOR)
    } else {
        limits.drop_debt
    };
    if (flow.no_payload || flow.window_bound) && debt > mark_at {
        Verdict::OverUncharged
    } else if debt > drop_at {
        Verdict::Drop
    } else if debt > mark_at {
        Verdict::OverMark
    } else {
        Verdict::Over
    }
}

/// A window-held packet of a class past its ceiling (`ceil` ≤ 0): the
/// ceiling bucket polices it. Its windows do not hold the class there: a
/// class alone on the link gets all of it whatever its windows (a window
/// holds nothing on a round trip of microseconds), and its own bucket's
/// debt says nothing (the link's excess over the capacity keeps it at the
/// drop threshold, where window-held packets pass uncharged). Past the
/// mark threshold of the ceiling's debt an ECN-capable packet is marked;
/// past the drop threshold × [`PACED_DROP_FACTOR`] every packet is
/// dropped.
///
/// Between the two, a packet without ECN is dropped each time the debt
/// grows past a multiple of [`spaced_drop_step`] ([`Verdict::DropCharged`]). Dropping all from the drop threshold on, as
/// within the ceiling, held a TCP flow under a 350 Mbit/s ceiling at 194
/// on average, its 100 ms windows alternating between 465 and 0: the
/// debt let it grow its window far past its share, and the run of losses
/// that came then cost it a retransmission timeout. Spaced drops, a
/// deeper hard threshold and a step of a quarter gave 302-362 in three
/// 4 s runs (a step of the whole mark threshold 302); the flow still
/// stalls now and then (its windows range 0-900), which an ECN flow,
/// marked instead, does not (237-254 under 250).
#[inline(always)]
pub const fn past_ceiling(ceil: i64, limits: &Limits, len: u64) -> Verdict {
    let before = ceil.unsigned_abs();
    let debt = len.saturating_add(before);
    let answers_marks = limits.flow.answers_marks;
    let drop_at = limits.drop_debt.saturating_mul(PACED_DROP_FACTOR);
    let step = spaced_drop_step(limits.mark_debt);
    if debt > drop_at {
        Verdict::Drop
    } else if !answers_marks && debt > limits.mark_debt && before / step != debt / step {
        Verdict::DropCharged
    } else {
        Verdict::PastCeiling {
            mark: debt > limits.mark_debt,
        }
    }
}

/// Least debt growth between two spaced drops ([`past_ceiling`]): one GSO
/// aggregate, which is what a drop of a received packet may lose.
pub const SPACED_DROP_MIN_STEP: u64 = 64 * 1024;

/// Debt growth between two spaced drops of a class past its ceiling: a
/// quarter of its mark threshold, at least [`SPACED_DROP_MIN_STEP`]. At
/// 17.5 Mbit/s (the root test's ceiling at the VM's rates) a quarter is 4
/// KB, three packets: the class got 0.38-0.43 of its ceiling there.
#[inline(always)]
pub const fn spaced_drop_step(mark_debt: u64) -> u64 {
    max_u64(mark_debt / 4, SPACED_DROP_MIN_STEP)
}

/// `level / depth` as a signed fraction in 1/1024 units, clamped to ±1.
#[inline(always)]
pub const fn fill_ratio(level: i64, depth: u64) -> i64 {
    if depth == 0 {
        return 0;
    }
    let mag = min_u64(level.unsigned_abs(), depth);
    // mag ≤ depth, so mag * UNIT / depth ≤ UNIT; mag * UNIT cannot overflow
    // for depths below 2^53.
    let r = match (mag.saturating_mul(UNIT)).checked_div(depth) {
        Some(r) => r as i64,
        None => 0,
    };
    if level < 0 { -r } else { r }
}

/// Fill (1/1024, ±1) of a class as the pacing loop sees it.
///
/// The own bucket is spent first, so a class that borrows keeps it near
/// zero; whether it uses its borrow allowance shows in the borrow bucket.
/// Debt in the own bucket (out-of-profile traffic) always means "slow down".
#[inline(always)]
pub const fn class_fill(own: i64, borrow: i64, cfg: &ClassConfig) -> i64 {
    let (depth, borrow_depth) = (cfg.depth, cfg.borrow_depth);
    let debt_margin = (depth / 16) as i64;
    let own_fill = fill_ratio(own, depth);
    if own < -debt_margin || borrow_is_noise(cfg) {
        own_fill
    } else {
        let b = fill_ratio(borrow, borrow_depth);
        if b > own_fill { b } else { own_fill }
    }
}

/// Level of a bucket the datapath refills lazily (on packets), `since_ns`
/// after its last refill: what it earned at `rate` meanwhile, clipped at
/// `depth` like a refill. This is what a reader at an arbitrary time (the
/// daemon) should see, not the level right after the last packet's charge. The
/// pacing loop, which runs on ACKs soon after sends, reads
/// [`mid_charge_level`] instead.
#[inline(always)]
pub const fn projected_level(level: i64, since_ns: u64, rate: u64, depth: u64) -> i64 {
    // earned() ≤ 1.25e10: fits an i64.
    let level = level.saturating_add(earned(since_ns, rate) as i64);
    let depth = min_i64_of_u64(depth);
    if level > depth { depth } else { level }
}

/// [`class_fill`] of a class whose buckets were last refilled `since_ns` ago
/// (see [`projected_level`]): for a reader at an arbitrary time.
#[inline(always)]
pub const fn class_fill_at(own: i64, borrow: i64, since_ns: u64, cfg: &ClassConfig) -> i64 {
    class_fill(
        projected_level(own, since_ns, cfg.guarantee, cfg.depth),
        projected_level(borrow, since_ns, cfg.borrow_rate, cfg.borrow_depth),
        cfg,
    )
}

/// Level the pacing loop reads for a bucket at `level` whose last charge
/// took `last_charge` bytes: halfway through that charge.
///
/// A bucket of a class sending at its rate is a sawtooth: it drops by a
/// packet at each packet and earns it back until the next. Its time average
/// is halfway up a tooth, but the loop runs on ACKs, which mostly come soon
/// after a send: it would read the bottom of the tooth. Where the depth is
/// little more than one GSO packet (75 KB at 30 Mbit/s, 68 KB packets) the
/// bottom of a full bucket is below the fill target, so a class sending
/// below its rate, its bucket overflowing, read "too fast" and was slowed
/// further, down to 17.1 of its 30 Mbit/s (6.1 VM, about one run in four).
/// Reading a projection to the ACK's time ([`projected_level`]) does not
/// help: the ACK is too early. Halfway through the charge is the tooth's
/// average whenever the ACK comes.
#[inline(always)]
pub const fn mid_charge_level(level: i64, last_charge: u64) -> i64 {
    level.saturating_add((min_u64(last_charge, i64::MAX as u64) / 2) as i64)
}

/// [`class_fill`] as the pacing loop reads it: the own bucket halfway
/// through its last charge (see [`mid_charge_level`]), the borrow bucket as
/// it is. The borrow bucket is shallow (10 ms, 32 KB at least): read halfway
/// through a 64 KB packet it could not show a borrower in debt. Tried in
/// the 6.1 VM: two borrowing classes then took up to 1.14 and 1.17 times
/// the capacity in 300 ms windows in the middle of a run; without it, up
/// to 1.06 there.
#[inline(always)]
pub const fn class_fill_mid_charge(
    own: i64,
    own_charge: u64,
    borrow: i64,
    cfg: &ClassConfig,
) -> i64 {
    class_fill(mid_charge_level(own, own_charge), borrow, cfg)
}

/// A borrow allowance below 1/16 of the guarantee is noise next to it: the
/// class is at its guarantee.
#[inline(always)]
pub const fn borrow_is_noise(cfg: &ClassConfig) -> bool {
    cfg.borrow_rate.saturating_mul(16) < cfg.guarantee
}

/// Next pacing multiplier of a class: integral action on the fill of its
/// buckets. A class whose buckets fill up (flows slower than allowed) speeds
/// its flows up; one in debt slows them down. `ki` is in 1/1024 per second.
///
/// `held`: the class's flows were held by our pacing lately. Only then may
/// the multiplier rise (anti-windup): a class whose buckets fill because its
/// flows are not yet held by it (slow start, a flow limited by its own
/// window or application) would otherwise wind the multiplier up to its
/// limit and overshoot once they are. It may fall at any time.
#[inline(always)]
pub const fn next_multiplier(mult: u64, fill: i64, ki: u64, elapsed_ns: u64, held: bool) -> u64 {
    let fill = fill - FILL_TARGET;
    if fill > 0 && !held {
        return max_u64(min_u64(mult, MULT_MAX), MULT_MIN);
    }
    let mult = max_u64(min_u64(mult, MULT_MAX), MULT_MIN);
    let dt_us = min_u64(elapsed_ns, MAX_CONTROL_STEP_NS) / 1000; // ≤ 50_000
    let e = fill.unsigned_abs(); // ≤ 1024
    // mult * e / 1024 ≤ 4096; * ki (≤ 2^20) * dt_us (≤ 2^16) < 2^48
    let step = (mult * e / UNIT) * min_u64(ki, 1 << 20) * dt_us / (UNIT * 1_000_000);
    let next = if fill < 0 {
        mult.saturating_sub(step)
    } else {
        mult + step
    };
    max_u64(min_u64(next, MULT_MAX), MULT_MIN)
}

/// Most [`ack_lead_us`] gives (µs).
pub const ACK_LEAD_MAX_US: u64 = 2 * ACK_LEAD_CAP_RTT_MAX_US;

/// How long (µs) the ACKs of an ACK-paced flow at `flow_rate` (wire
/// bytes/s, its class's per-flow share) wait for their clock: about
/// [`CLAMP_CEILING_SEGMENTS`] of its packet times, at most
/// [`ACK_LEAD_MAX_US`] ([`class_gains`]).
#[inline(always)]
pub const fn ack_lead_us(flow_rate: u64) -> u64 {
    // 4 × 1514 × 1e6 < 2^33.
    let lead = CLAMP_CEILING_SEGMENTS * SEGMENT_WIRE_BYTES * 1_000_000 / max_u64(flow_rate, 1);
    min_u64(lead, ACK_LEAD_MAX_US)
}

/// How much (1/1024, at most 1) an ACK-paced class's pacing gains shrink
/// beyond [`rtt_gain`] of its round trip `rtt_us` because its ACKs wait
/// `lead_us` ([`ack_lead_us`]): a change of its pacing shows in its
/// buckets a round trip after the ACKs already waiting leave at the rate
/// they were timed for, so the gains are sized for `rtt_us` + `lead_us`.
/// Slow flows wait long: 32 flows sharing 10 Mbit/s from 60 ms away kept
/// their ACKs about 155 ms (sender round trips of 240-330 ms), and with gains
/// sized for 60 ms their class's multiplier swung between 0.5 and 2.1
/// every 1.5 s, the class between 4 and 21 Mbit/s (6.1 VM, 2026-12-07).
#[inline(always)]
pub const fn lead_gain(rtt_us: u64, lead_us: u64) -> u64 {
    let rtt = max_u64(min_u64(rtt_us, 10_000_000), RTT_GAIN_FULL_US);
    let delayed = max_u64(
        min_u64(rtt_us, 10_000_000) + min_u64(lead_us, ACK_LEAD_MAX_US),
        RTT_GAIN_FULL_US,
    );
    UNIT * rtt / delayed
}

/// The pacing loop's gains (`kp`, `ki`: 1/1024, and 1/1024 per second) of a
/// class with settings `cfg` whose flows' round trip is `rtt_us` (0: none
/// measured), from the configured ones: [`rtt_gain`], with ACK pacing
/// (`ack_paced`) [`lead_gain`] of its per-flow share's waiting ACKs,
/// [`depth_gain`] for `ki`, and both at most what the loop's delay allows
/// ([`delay_bound_gains`]). User space sets them with the class's other
/// settings (`ClassConfig::pacing_kp`, `pacing_ki`): computed in the
/// datapath, the lead's branches took the ingress program past the
/// verifier's million instructions on 6.18.
pub const fn class_gains(
    kp: u64,
    ki: u64,
    rtt_us: u64,
    cfg: &ClassConfig,
    ack_paced: bool,
) -> (u64, u64) {
    let lead = ack_lead_us(cfg.flow_base);
    let scale = if ack_paced {
        lead_gain(rtt_us, lead)
    } else {
        UNIT
    };
    // Gains ≤ 2^22 (see `rtt_gain`), × scale ≤ 1024: fits.
    let kp = min_u64(rtt_gain(kp, rtt_us), 1 << 22) * scale / UNIT;
    let ki = depth_gain(
        min_u64(rtt_gain(ki, rtt_us), 1 << 22) * scale / UNIT,
        cfg,
        ack_paced,
    );
    if !ack_paced {
        return (kp, ki);
    }
    // The bucket the loop reads: the own one at the guarantee; a borrower's
    // fill comes from the shallower of its two.
    let (depth, rate) = if borrow_is_noise(cfg) {
        (cfg.depth, cfg.guarantee)
    } else {
        (min_u64(cfg.depth, cfg.borrow_depth), class_rate(cfg))
    };
    let delay = min_u64(rtt_us, 10_000_000) + lead;
    let (kp_max, ki_max) = delay_bound_gains(depth, rate, delay);
    (min_u64(kp, kp_max), min_u64(ki, ki_max))
}

/// Shortest loop delay [`delay_bound_gains`] sizes gains for (µs).
pub const LOOP_DELAY_MIN_US: u64 = 10_000;

/// Largest pacing gains (`kp`, `ki` as for [`class_gains`]) of an ACK-paced
/// class whose loop reads a bucket `depth` bytes deep that earns `rate`
/// wire bytes/s (its own at its guarantee; a borrower's shallower bucket at
/// its allocation), and whose rate changes reach that bucket `delay_us`
/// later (its round trip and its flows' waiting ACKs): the bucket
/// integrates the class's excess over `depth` / `rate` seconds (T), the multiplier
/// integrates the fill, and the proportional term on the fill is the only
/// damping. Crossing over at half a radian over the delay (`kp` = T / 2D)
/// with the integral's zero 1.6 times below (`ki` = T / 6.5D²) leaves the
/// loop about 30° of phase. Measured in the 6.1 VM (2026-12-07): sixteen
/// flows sharing 10 Mbit/s from 60 ms away (T 52 ms, delay 138 ms) had a
/// proportional gain of 0.013 (scaled by their per-flow rate) against ki
/// 1.1/s, and their class swung between 7.2 and 11.3 Mbit/s with a 1.5 s
/// period, its multiplier between its floor and 1.19. With kp 0.16 and ki
/// 0.43/s the multiplier stayed within 0.99-1.02, and the class's worst
/// 100 ms window went from 0.71-0.75 of its share to 0.88-0.90.
pub const fn delay_bound_gains(depth: u64, rate: u64, delay_us: u64) -> (u64, u64) {
    if rate == 0 || depth == 0 {
        return (u64::MAX, u64::MAX);
    }
    // Bucket time (µs), at most 100 s; delay 10 ms .. ~10.4 s.
    let t_us = min_u64(min_u64(depth, 1 << 40) * 1_000_000 / rate, 100_000_000);
    let d_us = min_u64(
        max_u64(delay_us, LOOP_DELAY_MIN_US),
        10_000_000 + ACK_LEAD_MAX_US,
    );
    // UNIT × 1e8 < 2^37; × 2e6 for ki < 2^58.
    let kp = UNIT * t_us / (2 * d_us);
    let ki = UNIT * t_us * 2 / 13 * 1_000_000 / d_us / d_us;
    (kp, ki)
}

/// Round trip up to which the pacing loop's gains apply in full; beyond
/// it they shrink in proportion ([`rtt_gain`]).
pub const RTT_GAIN_FULL_US: u64 = 30_000;

/// A pacing gain (`kp` or `ki`) of a class whose flows' round trip is
/// `rtt_us`: in full up to 30 ms, then × 30 ms / round trip. An ACK clock
/// sets a new rate at once, but the class's buckets see it a round trip
/// later: from 60 ms away, with the full gains, a class's multiplier swung
/// between 0.7 and 4 within half a second (it rose from 1.3 to 4 in 0.36 s
/// while the class already received 16 of its 12 Mbit/s). Measured there
/// (five runs each): × 20 ms / RTT left the largest class at 0.76–0.90 of
/// its share; × 30 ms / RTT held every class within 12 % of its share (the
/// largest within 7 %) with the worst p5 window at 0.57–0.70 of the quota
/// (0.40–0.56 in full).
#[inline(always)]
pub const fn rtt_gain(gain: u64, rtt_us: u64) -> u64 {
    if rtt_us <= RTT_GAIN_FULL_US {
        gain
    } else {
        // gain ≤ 2^22 (kp ≤ 4096, ki ≤ 2^20 where they are used): fits.
        min_u64(gain, 1 << 22) * RTT_GAIN_FULL_US / min_u64(rtt_us, 10_000_000)
    }
}

/// Own-bucket depth, in time at the guarantee, up to which the integral
/// gain applies in full ([`depth_gain`]).
pub const KI_FULL_DEPTH_NS: u64 = 100_000_000;

/// The integral gain `ki` of an ACK-paced class whose fill is read from its
/// own bucket (at its guarantee, [`borrow_is_noise`]): in full while the bucket holds
/// up to 100 ms at the guarantee, then × 100 ms / the time it holds. The
/// bucket integrates the class's excess and the multiplier integrates the
/// fill: the pair swings at √(ki / bucket time), damped by `kp` / bucket
/// time. A small class's bucket is its 64 KB floor, 262 ms at 2 Mbit/s;
/// with the full gain from 60 ms away (ki 2.5/s) the 6.1 VM showed its
/// multiplier swinging between 0.5 and 1.7 with a 2 s period. It applies
/// to ACK clocks only: sender pacing (egress) was not measured with it.
/// [`delay_bound_gains`] bounds it further where the loop is slow.
#[inline(always)]
pub const fn depth_gain(ki: u64, cfg: &ClassConfig, ack_paced: bool) -> u64 {
    if !(ack_paced && borrow_is_noise(cfg)) {
        return ki;
    }
    // ≤ 1.25e9 bytes: × ki (≤ 2^22) fits.
    let full = min_u64(cfg.guarantee, MAX_RATE) / (NS_PER_SEC / KI_FULL_DEPTH_NS);
    if cfg.depth <= full {
        ki
    } else {
        min_u64(ki, 1 << 22) * full / cfg.depth
    }
}

/// A class's round trip after one of its flows reported `flow_rtt_us` at a
/// window-clamp step: the longest of its flows', forgetting 1/16 per step
/// so that a flow that left stops counting after some dozens of steps.
#[inline(always)]
pub const fn class_rtt(class_rtt_us: u64, flow_rtt_us: u64) -> u64 {
    max_u64(flow_rtt_us, class_rtt_us - class_rtt_us / 16)
}

/// Length of the windows whose least sample is a received flow's path round
/// trip ([`path_rtt_update`]).
pub const PATH_RTT_WINDOW_NS: u64 = 200_000_000;
/// A path probe whose echo has not come for this long is given up (its ACK,
/// or the data that answered it, was lost).
pub const PATH_PROBE_STALE_NS: u64 = 1_000_000_000;
/// Most that a path round trip longer than the handshake's adds to the round
/// trip a receive window covers ([`window_rtt_us`]).
pub const PATH_RTT_EXTRA_MAX_US: u64 = 200_000;

/// A received flow's path round trip: from when one of its ACKs left the
/// shaped interface (after any hold) to the first data segment that echoes
/// its TCP timestamp. Unlike the smoothed RTT of a receiver, which is its
/// handshake's, it sees a queue that grew upstream after the handshake (a
/// flood filling the link's buffer); unlike the time from an ACK's creation,
/// it leaves out the hold of ACK pacing itself. The sender's own delays (an
/// idle application) lengthen single samples, so the figure is the least
/// sample of the last whole [`PATH_RTT_WINDOW_NS`] window: a queue that
/// stays that long counts, a burst does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathRtt {
    /// The least sample of the last whole window (µs; 0 = none yet).
    pub rtt_us: u32,
    /// The least sample of the current window so far (µs).
    pub min_us: u32,
    /// When the current window started (0 = no sample yet).
    pub window_ns: u64,
}

/// [`PathRtt`] after a sample of `sample_us` at `now_ns`: a sample after the
/// window's end closes it (its least sample becomes the figure) and opens
/// the next. A window without samples (an idle flow) leaves the figure as
/// it was.
#[inline(always)]
pub const fn path_rtt_update(p: PathRtt, sample_us: u64, now_ns: u64) -> PathRtt {
    let sample = max_u64(min_u64(sample_us, u32::MAX as u64), 1) as u32;
    if p.window_ns == 0 {
        PathRtt {
            rtt_us: p.rtt_us,
            min_us: sample,
            window_ns: now_ns,
        }
    } else if now_ns.saturating_sub(p.window_ns) >= PATH_RTT_WINDOW_NS {
        PathRtt {
            rtt_us: p.min_us,
            min_us: sample,
            window_ns: now_ns,
        }
    } else {
        PathRtt {
            rtt_us: p.rtt_us,
            min_us: if sample < p.min_us { sample } else { p.min_us },
            window_ns: p.window_ns,
        }
    }
}

/// A path probe's sample (µs; 0: none) when data echoing its timestamp
/// arrives at `now_ns`: the probe left at `out_ns`, when the flow had
/// received `bytes_at_start` bytes, and `bytes_before` had come before
/// this packet. No sample for a probe answered before it left (an earlier
/// ACK carried the same timestamp), one older than
/// [`PATH_PROBE_STALE_NS`], or one answered by the first data after an
/// idle spell (nothing came in between): its sender's pause is not the
/// path's, and a single sample opening a window after a pause would stand
/// as the figure ([`path_rtt_update`]).
#[inline(always)]
pub const fn path_probe_sample(
    out_ns: u64,
    now_ns: u64,
    bytes_at_start: u64,
    bytes_before: u64,
) -> u64 {
    if now_ns < out_ns || now_ns - out_ns > PATH_PROBE_STALE_NS || bytes_before == bytes_at_start {
        0
    } else {
        max_u64((now_ns - out_ns) / 1_000, 1)
    }
}

/// Round trip (µs) a received flow's receive window must cover: its
/// handshake's (`handshake_us`, what a receiver's smoothed RTT stays at), or
/// its measured path round trip (`path_us`, [`PathRtt`]) where that is
/// longer, by at most [`PATH_RTT_EXTRA_MAX_US`]. A window sized from the
/// handshake alone held a TCP flow beside a UDP flood at 18–21 of its 25
/// Mbit/s: the flood's upstream queue (40 ms) made its round trip four
/// times the ceiling's. The datapath applies it to ACK-paced flows whose
/// handshake took under [`CLAMP_FOLLOWS_CLOCK_RTT_US`] (the path is
/// measured only with ACK pacing): one from further away gets its ceiling
/// at every step ([`receive_window_clamp`]), so a ceiling sized from the
/// path grew with the queue its own class built.
#[inline(always)]
pub const fn window_rtt_us(handshake_us: u64, path_us: u64) -> u64 {
    if path_us > handshake_us {
        min_u64(path_us, handshake_us + PATH_RTT_EXTRA_MAX_US)
    } else {
        handshake_us
    }
}

/// Per-flow rate at and above which the proportional gain applies in full
/// with sender pacing. A slower flow sends its (up to 64 KB) segments
/// further apart, so it sees the effect of a rate change later; its gain
/// shrinks in proportion, which keeps the loop from oscillating with many
/// slow flows.
pub const KP_FULL_RATE: u64 = 12_500_000;

/// Per-flow rate at which the proportional gain of a class's flows is full:
/// [`KP_FULL_RATE`] with sender pacing, and 1 (every flow in full) where
/// ACK clocks pace them. An ACK clock applies a new rate at the flow's next
/// received packet, and an ACK-paced class's gains are sized whole for its
/// bucket and loop delay in user space ([`delay_bound_gains`]). Scaled by
/// the per-flow rate (in full from 12.5 Mbit/s, less for deep buckets,
/// until 2026-12-07), the proportional term of a class of many slow flows
/// all but vanished: sixteen flows sharing 10 Mbit/s from 60 ms away had
/// 0.013 and swung between 7.2 and 11.3 Mbit/s (see
/// [`delay_bound_gains`]).
#[inline(always)]
pub const fn kp_full_rate(ack_paced: bool) -> u64 {
    if ack_paced { 1 } else { KP_FULL_RATE }
}

/// Pacing rate of one flow: feed-forward share × class multiplier, corrected
/// in proportion to the class's bucket fill (`kp` in 1/1024, scaled down for
/// flows slower than `full_rate`, see [`kp_full_rate`]), never below a
/// quarter of the feed-forward share nor above `max`.
#[inline(always)]
pub const fn pacing_rate(
    flow_base: u64,
    mult: u64,
    fill: i64,
    kp: u64,
    full_rate: u64,
    max: u64,
) -> u64 {
    let fill = fill - FILL_TARGET;
    let base = min_u64(flow_base, MAX_RATE) / UNIT * min_u64(mult, MULT_MAX);
    let e = fill.unsigned_abs(); // ≤ 1152
    let full_rate = max_u64(min_u64(full_rate, KP_FULL_RATE), 1);
    // kp ≤ 4096 × full_rate ≤ 12.5e6: fits.
    let kp = min_u64(kp, 4 * UNIT) * min_u64(base, full_rate) / full_rate;
    // base ≤ 1.25e10 / 1024 * 4096 = 5e10; /1024 * 1152 * kp(≤ 4096) fits.
    let adj = (base / UNIT) * e / UNIT * kp;
    let rate = if fill < 0 {
        base.saturating_sub(adj)
    } else {
        base + adj
    };
    let floor = min_u64(flow_base, MAX_RATE) / 4;
    let rate = max_u64(rate, floor);
    if max == 0 { rate } else { min_u64(rate, max) }
}

/// Round trip up to which a borrowing class in debt is cut back to its
/// guarantee at once ([`flow_share`]): the pacing loop's full-gain range.
pub const DEBT_CUT_RTT_MAX_US: u64 = RTT_GAIN_FULL_US;

/// Feed-forward share and multiplier one flow of a class is paced with:
/// the allocator's per-flow share and the class multiplier, cut back at
/// once (without waiting for the allocator) when the class is in debt.
///
/// - In debt while borrowing: the spare it was pacing for is gone (its owner
///   came back), so the share falls back to the guaranteed part. Not for a
///   class whose round trip (`rtt_us`) is past [`DEBT_CUT_RTT_MAX_US`]:
///   an ACK clock reaches its senders a round trip late, so such a class
///   runs into debt by its own loop's overshoot, and the cut then starved
///   it. From 60 ms away (the 6.1 VM, 2026-12-07, 10 ms allocator trace)
///   two borrowing classes' buckets sank into debt every second with the
///   owner idle; each cut silenced the class for 30 ms, the allocator lent
///   its share to the other, and the two traded 100 ms windows of 0-20
///   Mbit/s (one-idle 4.8 / 13.8 of 5 / 15 at 92 %). Without the cut
///   there: 5.0 / 14.9 at 96-99 %. The allocator takes the spare back
///   within a step or two of the owner's return either way. The class's
///   round trip is near its furthest flow's (`class_rtt`), so one far flow
///   turns the cut off for its near ones too; egress classes have none
///   (0) and are always cut.
/// - A burst of new connections overshoots until the epochs have counted
///   them: once it drives the class into debt, `young` flows get at most an
///   even share of the class and no multiplier above 1.
#[inline(always)]
pub const fn flow_share(
    cfg: &ClassConfig,
    own: i64,
    mult: u64,
    flows_open: u64,
    young: bool,
    rtt_us: u64,
) -> (u64, u64) {
    let mut base = cfg.flow_base;
    if own < -(cfg.mark_debt as i64) && cfg.alloc > cfg.guarantee && rtt_us <= DEBT_CUT_RTT_MAX_US {
        let ratio = match (cfg.guarantee * UNIT).checked_div(cfg.alloc) {
            Some(r) => r,
            None => UNIT,
        };
        base = base / UNIT * ratio;
    }
    let mut mult = mult;
    if young && own < 0 {
        mult = min_u64(mult, UNIT);
        let even = match cfg.alloc.checked_div(flows_open) {
            Some(s) => s,
            None => cfg.alloc,
        };
        base = min_u64(base, even);
    }
    (base, mult)
}

/// Whole activity epochs a flow skips (nothing received or acknowledged)
/// before it counts as woken from idle ([`woke_from_idle`]).
pub const IDLE_EPOCHS_WOKEN: u64 = 2;
/// Bytes a flow woken from idle moves before it counts in full: two full
/// segments, a first flight's least; more than a poll or a heartbeat.
pub const WOKEN_COUNT_BYTES: u64 = 2 * 1448;

/// Whether a flow last counted in activity epoch `flow_epoch` wakes from
/// idle in `epoch`. Its use since it was last counted (little over the
/// gap) says nothing then: it counts in full, as a new flow does, once it
/// has moved [`WOKEN_COUNT_BYTES`] within that epoch (from the epoch after,
/// if it moved them only then), and by its use otherwise. Connections left
/// idle that start together (iperf3 -P connects every stream before any
/// sends; a pool of keep-alive connections) were otherwise each paced at about their class's whole
/// rate until the epochs had counted them, 300–500 ms: from 60 ms away, 32
/// such flows' slow starts overflowed the link's buffer upstream and the
/// single flow beside them lost 70–120 KB (2026-12-05). Counted in full at
/// the wake itself, a heartbeat or a poll every second would count as a
/// flow in most epochs beside a bulk one.
#[inline(always)]
pub const fn woke_from_idle(flow_epoch: u64, epoch: u64) -> bool {
    flow_epoch != 0 && epoch > flow_epoch + IDLE_EPOCHS_WOKEN
}

/// How long after its start (its first packet, or its wake from idle) a
/// flow that moves counts in full in its class's activity epochs
/// ([`young_counts_in_full`]).
pub const YOUNG_COUNT_NS: u64 = 1_000_000_000;

/// Whether a flow counted by its use (`BY_USE`) that started `age_ns` ago
/// (see [`YOUNG_COUNT_NS`]) and moved `moved` bytes since it was last counted
/// counts in full instead: a flow in slow start uses a fraction of its rate
/// however much it wants. Counted by use, 32 flows starting together from
/// 60 ms away counted as 10, 11, 20 and 22 over their first 900 ms; their
/// class, paced for a third as many flows, ran at 12-20 Mbit/s against its
/// 10 into its debt's CE marks (400), and then at 4.5-6 for 1.3 s (6.1 VM,
/// 2026-12-07). One moving less than [`WOKEN_COUNT_BYTES`] (a request, a
/// heartbeat) still counts by its use.
#[inline(always)]
pub const fn young_counts_in_full(age_ns: u64, moved: u64) -> bool {
    age_ns < YOUNG_COUNT_NS && moved >= WOKEN_COUNT_BYTES
}

/// [`epoch_count`]'s answer for a flow counted by its use.
pub const BY_USE: u64 = u64::MAX;

/// The `SockClass::flags` bits of a flow woken from idle.
pub const SOCK_WOKEN_BITS: u32 = SOCK_WOKEN | SOCK_WOKEN_LATE;

/// How a flow counts at its first call in an activity epoch and its
/// `SockClass::flags` after: `UNIT` (in full), 0 (not yet: woken from idle,
/// see [`woke_from_idle`]) or [`BY_USE`]. `first`: it has not been counted
/// before (or its byte count went back), so its use is unknown; `woke`: it
/// wakes in this epoch; `moved`: its bytes since it was last counted.
#[inline(always)]
pub const fn epoch_count(flags: u32, first: bool, woke: bool, moved: u64) -> (u64, u32) {
    let cleared = flags & !SOCK_WOKEN_BITS;
    if first {
        (UNIT, cleared)
    } else if woke {
        (0, cleared | SOCK_WOKEN)
    } else if flags & SOCK_WOKEN == 0 {
        (BY_USE, flags)
    } else if moved >= WOKEN_COUNT_BYTES {
        (UNIT, cleared)
    } else if flags & SOCK_WOKEN_LATE != 0 {
        (BY_USE, cleared)
    } else {
        (BY_USE, flags | SOCK_WOKEN_LATE)
    }
}

/// Whether a woken flow (`flags`) counts in full now, between the starts of
/// epochs, having moved `moved` bytes since its epoch's: only in its wake
/// epoch (the epoch after, it was counted by its use at its start; it counts
/// in full at the next one's if it moved enough, see [`epoch_count`]).
#[inline(always)]
pub const fn woken_counts_now(flags: u32, moved: u64) -> bool {
    flags & SOCK_WOKEN_BITS == SOCK_WOKEN && moved >= WOKEN_COUNT_BYTES
}

/// Activity epoch over which user space counts a class's flows (it advances
/// `NetGlobal::epoch`).
pub const ACTIVITY_EPOCH_NS: u64 = 100_000_000;

/// How much one flow counts (1/1024) among the flows its class's allocation
/// is split over, for an activity epoch: by how much of `rate` (its own
/// pacing rate, at most its class's use per flow: see
/// [`weight_reference`]) it used since it was last counted (`moved` bytes
/// over `elapsed_ns`). A flow using under half of its rate (a chatty control
/// connection, a request/response flow) counts by what it uses, so that
/// the bulk flows beside it get the class's share between them (max-min
/// within the class) instead of waiting for the class multiplier to make up
/// for the flow that does not use its part. From half its rate the weight
/// rises to one at three quarters: a flow held at its rate counts fully
/// whatever the multiplier, so equal flows stay equal (were the weight
/// `used / rate` throughout, their count would drift down with the
/// multiplier).
///
/// Measured in the 6.1 VM (all-busy at 20 Mbit/s from 60 ms away, see the
/// README): a 2 Mbit/s group's bulk flow beside its 0.2 Mbit/s
/// request/response flow was paced at half the group's share and needed the
/// multiplier, which rises slowly from afar, to reach the rest.
///
/// `elapsed_ns` counts as at least nine tenths of an activity epoch: a burst
/// that crosses an epoch's start is counted twice within microseconds, at
/// its full rate, and would count in full. A flow waking from idle is
/// counted at its first packet with little moved since its last count, so
/// it counts by its use from the epoch after (100 ms later than a flow
/// counted on sight; until then the multiplier corrects its class).
#[inline(always)]
pub const fn activity_weight(moved: u64, elapsed_ns: u64, rate: u64) -> u64 {
    use_weight(flow_use(moved, elapsed_ns), rate)
}

/// [`activity_weight`] of a flow that used `used` bytes/s ([`flow_use`]).
#[inline(always)]
pub const fn use_weight(used: u64, rate: u64) -> u64 {
    let rate = max_u64(min_u64(rate, MAX_RATE), 1);
    // used ≤ 2 × MAX_RATE here; × 1024 < 2^45.
    let r = min_u64(used, 2 * rate) * UNIT / rate;
    if r <= UNIT / 2 {
        r
    } else {
        min_u64(2 * r - UNIT / 2, UNIT)
    }
}

/// Bytes/s a flow moved: `moved` bytes over `elapsed_ns`, counted as at
/// least nine tenths of an activity epoch (see [`activity_weight`]).
#[inline(always)]
pub const fn flow_use(moved: u64, elapsed_ns: u64) -> u64 {
    let elapsed_us = max_u64(elapsed_ns, ACTIVITY_EPOCH_NS / 10 * 9) / 1000;
    // moved ≤ 2^40 (1 TB); × 1e6 < 2^60.
    min_u64(moved, 1 << 40) * 1_000_000 / elapsed_us
}

/// Bytes/s per unit of a flow's use in its class's use sums: fine enough
/// for a flow of a few kbit/s (in KiB/s, 32 flows of a 256 kbit/s class
/// would all count 0 and leave no reference).
pub const USE_UNIT_BYTES: u64 = 128;
/// Most a flow's use adds to its class's use sums, in [`USE_UNIT_BYTES`]
/// (2.1 Gbit/s; a faster flow is weighed against its own rate or this,
/// and counts in full either way): its square summed over 2^21 flow counts
/// stays below 2^64.
pub const USE_UNITS_MAX: u64 = 1 << 21;

/// A flow's use (bytes/s) as its class's use sums count it: in
/// [`USE_UNIT_BYTES`], at most [`USE_UNITS_MAX`]. User space weighs flows
/// against Σ use² / Σ use over the class's flows (`ClassConfig::flow_even`).
#[inline(always)]
pub const fn use_units(used: u64) -> u64 {
    min_u64(used / USE_UNIT_BYTES, USE_UNITS_MAX)
}

/// The rate a flow's use is weighed against in [`activity_weight`]: its own
/// pacing rate `rate`, but no more than `even`, its class's use per flow
/// lately, weighted by use (Σ use² / Σ use over its flows: the bulk flows'
/// use beside light ones, every flow's when they are equal; 0: not known).
/// Against its own rate alone the weights fed back on themselves: a count
/// below the flows there raises every flow's rate, which flows bound by
/// their windows cannot follow at once, so they use a smaller part of it
/// and count less again. Measured in the 6.1 VM (many-flows from 60 ms
/// away): 32 busy flows counted as 1.1 to 32 from one half second to the
/// next, their rates swung with it and the class ran into its marking
/// debt. The use does not rise with the rates, and flows that all slow
/// down together (a mark halved their windows) still count in full. A
/// plain average would be dragged down by light flows: beside twenty of
/// them a bulk flow would be paced at a twentieth of its class.
#[inline(always)]
pub const fn weight_reference(rate: u64, even: u64) -> u64 {
    if even == 0 { rate } else { min_u64(rate, even) }
}

/// Whether a socket's pacing should be rewritten: only when the target moved
/// by more than 1/32, to keep setsockopt calls rare.
#[inline(always)]
pub const fn pacing_changed(applied: u64, target: u64) -> bool {
    let diff = applied.abs_diff(target);
    diff > target / 32 || applied == 0
}

/// Converts a wire rate to the rate TCP paces at (it counts segment payload
/// plus its own header, not IP and Ethernet headers): 1480/1514 of the wire
/// bytes for a 1500-byte MTU.
#[inline(always)]
pub const fn wire_to_tcp_rate(wire: u64) -> u64 {
    min_u64(wire, MAX_RATE) / 1514 * 1480
}

/// Receive-window clamp (bytes) that holds a flow at `wire_rate` bytes/s when
/// its round trip takes `rtt_us`: rate × RTT of TCP payload, at least two
/// segments (below that the sender stalls on delayed ACKs).
#[inline(always)]
pub const fn window_clamp(wire_rate: u64, rtt_us: u64, mss: u64) -> u64 {
    let tcp = wire_to_tcp_rate(wire_rate);
    // tcp ≤ 1.25e10, rtt capped at 10 s: the product fits.
    let w = tcp * min_u64(rtt_us, 10_000_000) / 1_000_000;
    let floor = 2 * min_u64(max_u64(mss, 536), 65_535);
    min_u64(max_u64(w, floor), u32::MAX as u64 / 2)
}

/// How often a receive flow's window clamp is corrected, at the least.
pub const CLAMP_STEP_NS: u64 = 20_000_000;

/// Longest window-clamp step: a step looks the flow's class up, which
/// counts the flow as active, and a flow must be counted in every 100 ms
/// activity epoch (user space's) it receives in.
pub const CLAMP_STEP_MAX_NS: u64 = 80_000_000;

/// How often the window clamp of a receive flow whose smoothed round trip
/// is `rtt_us` is corrected: once per round trip, between 20 and 80 ms. A
/// new clamp shows in the received rate only a round trip later; stepped
/// three times per round trip on the same stale rate, a flow 60 ms away
/// could have its clamp cut eightfold before the first cut showed.
#[inline(always)]
pub const fn clamp_step_ns(rtt_us: u64) -> u64 {
    let rtt_ns = min_u64(rtt_us, CLAMP_STEP_MAX_NS / 1_000) * 1_000;
    max_u64(CLAMP_STEP_NS, rtt_ns)
}

/// Room a receive-window clamp's ceiling leaves beyond the round trip.
pub const CLAMP_CEILING_SLACK_US: u64 = 10_000;

/// Largest receive-window clamp of a flow held at `target` (wire bytes/s)
/// whose smoothed round trip is `rtt_us` (a receiver's is its handshake's):
/// `target` × (round trip + 10 ms), at least two segments. A flow whose
/// clamp sits there receives less than its target by a window that large:
/// held by a round trip longer than it started with (or sending less), not
/// by its clamp. An ACK-paced flow's ACKs wait at most the 10 ms (what a
/// window beyond its round trip holds), below the CE mark threshold. The
/// round trip counts: with 10 ms alone a download from 60 ms away was held
/// to a sixth of its rate before the pacing multiplier (at most 4) made up
/// for part of it.
#[inline(always)]
pub const fn window_clamp_ceiling(target: u64, rtt_us: u64, mss: u64) -> u64 {
    window_clamp(
        target,
        min_u64(rtt_us, 10_000_000) + CLAMP_CEILING_SLACK_US,
        mss,
    )
}

/// Segments the receive-window ceiling of an ACK-paced flow leaves beyond
/// its round trip at the least ([`ack_paced_clamp_ceiling`]).
pub const CLAMP_CEILING_SEGMENTS: u64 = 4;

/// [`window_clamp_ceiling`] of a flow whose ACKs are paced, at least
/// `target` × round trip + four segments: more than the two packet times
/// of ACK lead that show a flow held by its ACK clock
/// ([`ack_lead_holds`]). With 10 ms alone a slow flow at its ceiling kept
/// its ACKs waiting less than that, never counted as held, and its class's
/// multiplier could not rise to make up for a share split over a bulk flow
/// and a request/response flow: from 60 ms away the 2 Mbit/s class stayed
/// at 1.2–1.5 with its buckets full (its window 7–8 segments, the
/// sender's congestion window 36).
#[inline(always)]
pub const fn ack_paced_clamp_ceiling(target: u64, rtt_us: u64, mss: u64) -> u64 {
    ramped_clamp_ceiling(target, rtt_us, mss, CLAMP_CEILING_RAMP_NS)
}

/// How long the receive-window ceiling of an ACK-paced flow from afar takes
/// to grow its segments beyond the round trip from none to
/// [`CLAMP_CEILING_SEGMENTS`] ([`ramped_window_clamp`]).
pub const CLAMP_CEILING_RAMP_NS: u64 = 2_000_000_000;

/// [`ack_paced_clamp_ceiling`] of a flow `age_ns` after it started (or
/// woke from idle): its segments beyond the round trip grow from none to
/// [`CLAMP_CEILING_SEGMENTS`] over [`CLAMP_CEILING_RAMP_NS`], a whole
/// segment at a time.
#[inline(always)]
pub const fn ramped_clamp_ceiling(target: u64, rtt_us: u64, mss: u64, age_ns: u64) -> u64 {
    let segments =
        CLAMP_CEILING_SEGMENTS * min_u64(age_ns, CLAMP_CEILING_RAMP_NS) / CLAMP_CEILING_RAMP_NS;
    let extra = segments * min_u64(max_u64(mss, 536), 65_535);
    max_u64(
        window_clamp_ceiling(target, rtt_us, mss),
        window_clamp(target, rtt_us, mss) + extra,
    )
}

/// Receive-window clamp of an ACK-paced flow `age_ns` after it started (or
/// woke from idle) whose step gave `clamp` ([`receive_window_clamp`], for
/// `target` and the handshake's round trip `rtt_us`): from 10 ms away, at
/// most [`ramped_clamp_ceiling`]. The segments a slow flow's window holds
/// beyond its round trip are ACKs waiting on its clock once it runs; while
/// its window grows into them, slow start sends two segments per paced
/// ACK, and the class runs above its rate until they are full. For 32 flows
/// sharing 10 Mbit/s from 60 ms away, four segments each are 185 KB, two
/// and a half times the class's round trip: the class ran at 11-17 Mbit/s
/// for its first second (the 6.1 VM, 2026-12-07). Grown a segment every
/// half second (46 KB for those 32 flows each time), the windows fill at
/// about 0.75 Mbit/s above the class's rate on average. A faster
/// flow's ceiling is its round trip plus 10 ms, which the ramp leaves as
/// it is. Near flows follow their measured rate instead.
#[inline(always)]
pub const fn ramped_window_clamp(
    clamp: u64,
    target: u64,
    rtt_us: u64,
    mss: u64,
    age_ns: u64,
) -> u64 {
    if rtt_us < CLAMP_FOLLOWS_CLOCK_RTT_US {
        return clamp;
    }
    min_u64(clamp, ramped_clamp_ceiling(target, rtt_us, mss, age_ns))
}

/// The receive-window clamp that the rate a flow received over the last
/// step reflects, of `applied` (set at that step's start) and `previous`
/// (set a step earlier; 0 = none): a window shows in the received rate a
/// round trip after it is advertised, so from a round trip of half a step
/// on, mostly the previous one. Scaling the newer clamp by a rate its
/// predecessor produced overshoots both ways: in a model of the loop, a
/// flow 60 ms away kept swinging between 0.7 and 1.1 of its window (0.4
/// and 1.1 when stepped every 20 ms).
#[inline(always)]
pub const fn clamp_seen(applied: u64, previous: u64, rtt_us: u64) -> u64 {
    // A step is 20 ms up to a 20 ms round trip and at most the round trip
    // beyond: the round trip reaches half a step exactly from 10 ms on.
    if previous != 0 && rtt_us >= CLAMP_STEP_NS / 2_000 {
        previous
    } else {
        applied
    }
}

/// Next receive-window clamp of a flow held at `target` (wire bytes/s) that
/// received at `measured` over the last step while its clamp was `clamp`
/// (see [`clamp_seen`]): the window that gave `measured` scaled to
/// `target` (rate = window / RTT, so this is target × the flow's effective
/// RTT), by at most a factor 2 per step, never below
/// two segments nor above `ceiling` ([`window_clamp_ceiling`] for its
/// round trip: a flow that cannot reach its target is not window-limited; a
/// huge clamp would take many steps to bite when it becomes so). `clamp` 0
/// starts from `initial`.
#[inline(always)]
pub const fn next_window_clamp(
    clamp: u64,
    measured: u64,
    target: u64,
    mss: u64,
    ceiling: u64,
    initial: u64,
) -> u64 {
    let floor = window_clamp(0, 0, mss);
    if clamp == 0 {
        return min_u64(max_u64(initial, floor), ceiling);
    }
    // target / measured in 1/1024, bounded to ½ .. 2 before it scales the
    // clamp: target ≤ 1.25e10 and clamp < 2^31 keep every product within
    // u64 (BPF has no 128-bit arithmetic). Nothing received: unchanged.
    let t = min_u64(target, MAX_RATE);
    let ratio = match (t * 1024).checked_div(measured) {
        Some(r) => min_u64(max_u64(r, 512), 2048),
        None => 1024,
    };
    let next = clamp * ratio / 1024;
    min_u64(max_u64(next, floor), ceiling)
}

/// Round trip (µs) from which an ACK-paced flow's receive-window clamp no
/// longer follows its measured rate (see [`receive_window_clamp`]): where a
/// step's rate is mostly the previous clamp's ([`clamp_seen`]).
pub const CLAMP_FOLLOWS_CLOCK_RTT_US: u64 = CLAMP_STEP_NS / 2_000;

/// Receive-window clamp of a flow whose ACKs are paced, at a step (the
/// arguments as for [`next_window_clamp`], with its handshake's round trip
/// `rtt_us` and the round trip its window covers, `window_rtt_us`: see
/// [`window_rtt_us`]). From 10 ms away it gets its ceiling
/// ([`ack_paced_clamp_ceiling`]) at every step: its ACK clock holds the
/// rate, and its window has only to bound the ACKs that wait. Scaled by
/// the rate the flow received, a window a round trip old ratchets down,
/// since a burst (slow start, a released backlog) halves it within one
/// step and a step with nothing received leaves it as it is. On shorter
/// round trips a step sees its own clamp's effect: those follow the
/// measured rate, up to a ceiling sized from `window_rtt_us`, so that a
/// window grows past the handshake's round trip only while the flow
/// receives less than its target (at the ceiling every step, a window
/// sized from a path that includes the queue its class built grows that
/// queue). Flows whose ACKs are not paced: [`unpaced_window_clamp`].
#[inline(always)]
pub const fn receive_window_clamp(
    clamp: u64,
    measured: u64,
    target: u64,
    mss: u64,
    rtt_us: u64,
    window_rtt_us: u64,
    initial: u64,
) -> u64 {
    if rtt_us >= CLAMP_FOLLOWS_CLOCK_RTT_US {
        return ack_paced_clamp_ceiling(target, rtt_us, mss);
    }
    let ceiling = ack_paced_clamp_ceiling(target, window_rtt_us, mss);
    next_window_clamp(clamp, measured, target, mss, ceiling, initial)
}

/// Buffer of the link upstream (the switch port received traffic queues
/// in) a shaper assumes unless told: a few hundred KB, as switch ports
/// commonly have per port.
pub const DEFAULT_UPSTREAM_BUFFER: u64 = 256 * 1024;
/// Bytes the receive windows of a shaper without ACK pacing add up to
/// beyond their round trips ([`unpaced_window_clamp`]), at
/// [`DEFAULT_UPSTREAM_BUFFER`]: the standing queue they keep upstream, in
/// the link's buffer, when its capacity is used. Half the buffer: the
/// rest absorbs bursts. Sized for 128 KB in a 64 KB buffer, the windows
/// overflowed it (all-busy's classes of 100 and 600 got p5 0.00 and 0.55
/// of their quotas, with 838 retransmissions).
pub const SHARED_QUEUE_BYTES: u64 = DEFAULT_UPSTREAM_BUFFER / 2;
/// Bounds of the time that queue takes ([`shared_queue_us`]). The upper
/// one is what low capacities need: a flow's window must cover two
/// segments at its share, or the floor gives it more (at 2 ms a 5 Mbit/s
/// class of a 50 Mbit/s capacity got 1.33-1.43 × its share in the VM).
pub const SHARED_QUEUE_MIN_US: u64 = 100;
pub const SHARED_QUEUE_MAX_US: u64 = 10_000;

/// Time (µs) `queue_bytes` take at `capacity` (wire bytes/s), within
/// 100 µs .. 10 ms: [`SHARED_QUEUE_BYTES`] take 1.05 ms at 1 Gbit/s, 104 µs
/// at 10, 10 ms at 100 Mbit/s and below.
#[inline(always)]
pub const fn shared_queue_us(queue_bytes: u64, capacity: u64) -> u64 {
    let bytes = min_u64(queue_bytes, u64::MAX / 1_000_000);
    let us = match (bytes * 1_000_000).checked_div(capacity) {
        Some(us) => us,
        None => SHARED_QUEUE_MAX_US,
    };
    min_u64(max_u64(us, SHARED_QUEUE_MIN_US), SHARED_QUEUE_MAX_US)
}

/// Receive-window clamp of a received flow whose ACKs are not paced (no
/// fq): its share, `flow_base` wire bytes/s, × its class's window
/// multiplier `mult` (1/8-4, set by user space: `netqos::policy::window_mults`, 0.5-4, or
/// `held_window_mult`, 1/8-4), × (its handshake's round trip
/// `rtt_us` + the shared queue's time `queue_us` ([`shared_queue_us`],
/// `NetGlobal::shared_queue_us`), see [`unpaced_window_time_us`]), at
/// least two segments.
///
/// Without ACK pacing the window is the only hold a receiver has, and a
/// window sized for the flow's own round trip holds nothing on a short
/// one: two segments per 5 µs (a veth) are 4.6 Gbit/s. But flows that
/// share a FIFO queue (the link's buffer upstream) get its capacity in
/// proportion to what they may have in flight, whatever their congestion
/// windows, once their windows add up to more than the path holds: their
/// round trips are then the same queue's. So every window covers the
/// same queue's time beyond its round trip, and the windows add up to the
/// capacity × that time: a standing queue of [`SHARED_QUEUE_BYTES`]
/// upstream, which sets every flow's rate in proportion to its share. The
/// link upstream runs faster than the configured capacity (it is set
/// below the link's rate), so each flow gets its share scaled by the
/// link's rate over the capacity.
///
/// Windows in proportion do not make rates quite in proportion: a
/// receiver reopens its window as its application reads, in steps of
/// about half the window, and 6 s runs gave a class 1.34 × its share
/// beside one at 0.94. The class's multiplier corrects that: it rises
/// while the class receives less than its allocation (its buckets fill).
/// It falls while the class is in debt, which every class is when the
/// link runs faster than the capacity: below 1 it would shrink every
/// window alike until the smallest reach the floor, so it counts from 1
/// up only. For the same reason the window does not follow the measured
/// rate (target / measured is below 1 for every flow).
#[inline(always)]
pub const fn unpaced_window_clamp(
    flow_base: u64,
    mult: u64,
    rtt_us: u64,
    queue_us: u64,
    mss: u64,
) -> u64 {
    // ≤ 1.25e10 × 4096: fits.
    let rate =
        min_u64(flow_base, MAX_RATE) * min_u64(max_u64(mult, WINDOW_MULT_FLOOR), MULT_MAX) / UNIT;
    window_clamp(rate, unpaced_window_time_us(rtt_us, queue_us), mss)
}

/// Time (µs) the window of a received flow held by its window covers: its
/// handshake's round trip `rtt_us` + the shared queue's time `q`
/// (`queue_us`, [`shared_queue_us`]), except that a round trip up to `q` counts as
/// queueing on a near path (the window covers `q` alone), and one
/// between `q` and `2q` counts in part (the time rises from `q` to `3q`,
/// continuous).
///
/// A flow opened while the queue upstream stands measures the queue in its
/// handshake: on-off's 600 Mbit/s class reconnected at 777 µs where it had
/// first seen 14 µs, and its windows, sized for 1.8 ms instead of 1.06,
/// took so much more that its class's multiplier had to fall to 0.82 and
/// the two other classes' rise to 1.3, which took most of a second after
/// every reconnect. A far flow (a round trip past `2q`) keeps its round trip
/// + `q`.
#[inline(always)]
pub const fn unpaced_window_time_us(rtt_us: u64, queue_us: u64) -> u64 {
    let q = min_u64(max_u64(queue_us, SHARED_QUEUE_MIN_US), SHARED_QUEUE_MAX_US);
    let rtt = min_u64(rtt_us, 10_000_000);
    let queued = min_u64(rtt, (2 * q).saturating_sub(rtt));
    rtt + q - queued
}

/// Shortest cap on how long a received flow's ACKs wait
/// ([`ack_lead_cap`]).
pub const ACK_LEAD_CAP_MIN_NS: u64 = 20_000_000;
/// Round trip (µs) beyond which [`ack_lead_cap`] grows no further.
pub const ACK_LEAD_CAP_RTT_MAX_US: u64 = 200_000;
/// Packet times an ACK may wait at the least ([`ack_lead_cap`]).
pub const ACK_LEAD_CAP_PACKETS: u64 = 6;
/// Queueing allowance (µs) the receive window of an ACK-paced flow without
/// ECN is sized for, on top of its round trip.
pub const ACK_LEAD_WINDOW_US: u64 = 2_000;
/// A class counts as held by its ACK clocks (see [`next_multiplier`]) for
/// this long after a received packet found its flow's clock ahead of real
/// time. A window clamp at its ceiling no longer counts: since the ceiling
/// covers the round trip, a flow there is held back by its sender, and a
/// flow 60 ms away whose window CUBIC regrew for seconds after a mark
/// wound the multiplier up to its limit of 4.
pub const HELD_RECENT_NS: u64 = 50_000_000;
/// The "held" stamp is written at most this often per class (it is one
/// shared cache line, written from every CPU receiving for the class).
pub const HELD_STAMP_NS: u64 = 1_000_000;

/// Whether a received packet whose ACK waits `lead` ns shows its flow held
/// by its ACK clock: more than two of its own packet times (`packet_ns`)
/// ahead, so that one GRO batch or burst does not count.
#[inline(always)]
pub const fn ack_lead_holds(lead: u64, packet_ns: u64) -> bool {
    lead > packet_ns.saturating_mul(2)
}

/// Whether a received packet arriving at `now` found its flow's ACK clock
/// (`next`, before the packet) behind real time by more than the packet's
/// time at the flow's rate (`packet_ns`): the flow was sending slower than
/// its rate, limited by its own window or application, not by its ACKs.
#[inline(always)]
pub const fn clock_fell_behind(next: u64, now: u64, packet_ns: u64) -> bool {
    next.saturating_add(packet_ns) < now
}

/// Whether a flow whose ACK clock last fell behind at `behind_ns` has been
/// held by it for its round trip (`rtt_us`; 0: none known) by `now`: only then
/// do its held ACKs count as its class held (see [`next_multiplier`]). A
/// flow bound by its window sends its window in a burst once a round trip;
/// from the tbf of a 21 Mbit/s link the burst runs ahead of a slower ACK
/// clock, so its packets looked held while the flow used less than its
/// rate, and the multiplier wound up. Measured in the 6.1 VM (many-flows
/// from 60 ms away): the single flow lost packets upstream when the 32
/// flows started, used 4–5 of its 10 Mbit/s for a second and a half while
/// its multiplier rose from 1.9 to 3.9, then ran into its marking debt as
/// its window regrew (115 CE marks) and fell to nothing.
#[inline(always)]
pub const fn clock_bound(behind_ns: u64, now: u64, rtt_us: u64) -> bool {
    // rtt_us ≤ 2^40 (a dozen days) here; saturating_mul would need a
    // 128-bit multiply the BPF target lacks.
    now.saturating_sub(behind_ns) >= min_u64(rtt_us, 1 << 40) * 1000
}

/// Whether a class whose held stamp is `held_ns` counts as held at `now`.
/// Without ACK pacing every class does: sender pacing always holds its
/// flows, and the anti-windup is for the ACK clocks only.
#[inline(always)]
pub const fn recently_held(ack_pacing: bool, held_ns: u64, now: u64) -> bool {
    !ack_pacing || now < held_ns.saturating_add(HELD_RECENT_NS)
}

/// ACK pacing of a received TCP flow held at `rate` (wire bytes/s): the
/// packet of `wire` bytes arriving at `now` is acknowledged no earlier than
/// the flow's virtual clock `next` (never earlier than `now`, nor later
/// than [`ack_lead_cap`] after it for its class's round trip `rtt_us`),
/// which then advances by the packet's time at the rate. A sender clocked by its ACKs then sends at the rate whatever
/// the round trip. Returns (earliest ACK departure, next virtual clock).
#[inline(always)]
pub const fn ack_release(next: u64, now: u64, wire: u64, rate: u64, rtt_us: u64) -> (u64, u64) {
    let rate = max_u64(rate, 1);
    // wire ≤ 2^32 (skb length), × 1e9 fits in u64 below 1.8e19.
    let dur = min_u64(min_u64(wire, 1 << 32) * NS_PER_SEC / rate, NS_PER_SEC);
    let cap = ack_lead_cap(rtt_us, dur);
    let start = min_u64(max_u64(next, now), now.saturating_add(cap));
    (start, start.saturating_add(dur))
}

/// Longest a received flow's ACKs wait for its ACK clock when its class's
/// round trip is `rtt_us` and a packet takes `packet_ns` at its rate: 20 ms,
/// twice the round trip (at most 400 ms) or six packet times, whichever is
/// longest. The window clamp keeps the wait near 10 ms or four packet
/// times ([`ack_paced_clamp_ceiling`]; with 20 ms alone the 32 slow flows
/// of many-flows, whose windows hold four packets of 15 ms, ran past their
/// share into their buckets' debt: 244 drops); it grows past that when the
/// flow's rate falls faster than its window can shrink (a window only
/// shrinks as data fills it: the class stops borrowing, the pacing loop's
/// boost ends, slow start overshoots). Past the cap the flow runs faster
/// than its rate until its next clamp step, instead of being marked (CUBIC
/// halves its window and, from 60 ms away, regrows it over seconds) or
/// dropped (which stalls it for a loss-probe timeout). Marks from 20 ms or
/// the round trip on left the smallest all-busy class at 60 ms marked
/// 9–19 times in its first second and its worst 100 ms window at 0.44–0.64
/// of its share (five runs); incast's sixteen flows at 21.0–23.4 of their
/// 25 Mbit/s without delay (four runs). The buckets still mark and drop a
/// class that runs into debt.
#[inline(always)]
pub const fn ack_lead_cap(rtt_us: u64, packet_ns: u64) -> u64 {
    let cap = max_u64(
        ACK_LEAD_CAP_MIN_NS,
        min_u64(rtt_us, ACK_LEAD_CAP_RTT_MAX_US) * 2_000,
    );
    max_u64(cap, min_u64(packet_ns, NS_PER_SEC) * ACK_LEAD_CAP_PACKETS)
}

/// Segments a sender puts in its first round trip (RFC 6928's initial
/// window, Linux's default): what a new flow granted the kernel's initial
/// receive window is charged ([`first_flight`]).
pub const SENDER_INITIAL_SEGMENTS: u64 = 10;
/// Segments of the kernel's initial receive window (64 KB, unscaled in the
/// SYN-ACK): a grant of as many leaves it.
pub const KERNEL_INITIAL_SEGMENTS: u64 = 65_535 / 1448;
/// Fewest segments a new flow's initial receive window is bounded to:
/// below two a sender waits for the delayed ACK.
pub const FIRST_FLIGHT_MIN_SEGMENTS: u64 = 2;
/// Wire bytes a first-flight segment is charged (1448 bytes of payload,
/// TCP with timestamps, IP and Ethernet headers).
pub const SEGMENT_WIRE_BYTES: u64 = 1514;
/// Round trip assumed for a class none of whose flows has measured one.
pub const FIRST_FLIGHT_RTT_US: u64 = 100_000;

/// Rate a class's new flows are sized from (wire bytes/s): its allocation,
/// or its guarantee before the allocator has given it one.
#[inline(always)]
pub const fn class_rate(cfg: &ClassConfig) -> u64 {
    if cfg.alloc > 0 {
        cfg.alloc
    } else {
        cfg.guarantee
    }
}

/// Whether a received flow has started: it has taken a segment's worth
/// (`received` bytes, `mss` as for [`window_clamp`]), more than what a
/// client sends on a connection before its transfer (iperf3's 37-byte
/// cookie, a request line). The first segment of data starts it, so the
/// ACK that answers it gets the flow's usual clamp.
#[inline(always)]
pub const fn flow_started(received: u64, mss: u64) -> bool {
    received >= min_u64(max_u64(mss, 536), 65_535)
}

/// Receive-window clamp of a received flow that has not started
/// ([`flow_started`]), or `None` once it has: its class's rate
/// `class_rate` (wire bytes/s) × its round trip `rtt_us`, split over the
/// class's `open` flows, at least two segments. Its window then stays at
/// about what its first flight was granted ([`first_flight`], which splits
/// the same way; TCP never moves an advertised window's right edge back)
/// until data flows. Sized at its first ACK from the class's rate over the
/// flows then counted, an idle connection's window grew with what it
/// received on connecting and stayed open for whenever it would start:
/// 32 iperf3 streams that connected over two seconds from 60 ms away held
/// windows of six segments (the median) up to 40, and started together
/// with about 460 KB against their class's 75 KB round trip and a 256 KB
/// buffer upstream (100-190 retransmissions a run, 2026-12-07). The split
/// over open flows, not a fixed two segments, because a flow still idle
/// when its shaper stops keeps its clamp until it closes.
///
/// Only for ACK-paced flows from afar, whose next clamp does not grow
/// from their last one ([`receive_window_clamp`]): a near ACK-paced flow
/// would take several steps to grow out of a small one, and without ACK
/// pacing (this host's veths) a two-segment bound cost the flows that
/// started beside 32 others up to 0.17 of their share in their worst
/// windows (many-flows' single flow 0.865 against 1.033 without it,
/// incast's guaranteed class 0.966 against 1.014, 2026-12-07).
#[inline(always)]
pub const fn unstarted_window_clamp(
    received: u64,
    mss: u64,
    ack_paced: bool,
    rtt_us: u64,
    class_rate: u64,
    open: u64,
) -> Option<u64> {
    if flow_started(received, mss) || !ack_paced || rtt_us < CLAMP_FOLLOWS_CLOCK_RTT_US {
        return None;
    }
    Some(window_clamp(class_rate / max_u64(open, 1), rtt_us, mss))
}

/// Full segments `rate` (wire bytes/s, at most `MAX_RATE`) moves in
/// `ns` (at most two seconds).
#[inline(always)]
const fn segments_in(rate: u64, ns: u64) -> u64 {
    // rate ≤ 1.25e10 and ≤ 2e6 µs: the product fits.
    rate * (min_u64(ns, 2 * NS_PER_SEC) / 1_000) / 1_000_000 / SEGMENT_WIRE_BYTES
}

/// Initial receive window of a flow a class accepts (segments, the reply
/// to `BPF_SOCK_OPS_RWND_INIT`; 0: the kernel's, about 64 KB) and the
/// class's first-flight clock after it (ns).
///
/// Before a flow's first ACK nothing else holds it back: there is no ACK to
/// pace and no window clamped yet. So what the first flights a class
/// accepts within one round trip are charged stays within its rate × that
/// round trip (each grant is at most the room left), and no flow's is
/// larger than that split over the class's `open` flows (those
/// that have moved anything) and itself: connections opened over seconds
/// and left idle (iperf3 -P connects every stream before any sends; pools
/// of keep-alive connections) may start sending together, long after their
/// SYNs. The flow gets what the two leave, at least two segments, or the
/// kernel's window where they leave as much. The clock is charged a
/// sender's usual initial window (ten segments) or the grant if smaller: a
/// sender with a larger one is bounded by the grant, not by the charge.
/// The clock runs ahead of `now` by what was charged and not yet drained
/// at `rate` (wire bytes/s); it stays within two round trips of `now`, so
/// a burst of flows is forgotten a round trip after the one it filled.
/// Thirty-two flows starting at once from 60 ms away can send about 460 KB
/// of initial windows into a link's 256 KB upstream buffer, before any
/// receiver can slow them. `rtt_us` 0: not known.
#[inline(always)]
pub const fn first_flight(
    clock_ns: u64,
    now: u64,
    rate: u64,
    rtt_us: u64,
    open: u64,
) -> (u32, u64) {
    if rate == 0 {
        return (0, clock_ns);
    }
    let rate = min_u64(rate, MAX_RATE);
    let rtt_ns = if rtt_us == 0 {
        FIRST_FLIGHT_RTT_US
    } else {
        min_u64(rtt_us, 1_000_000)
    } * 1_000;
    let start = max_u64(clock_ns, now);
    let room = segments_in(rate, (now + rtt_ns).saturating_sub(start));
    let share = segments_in(rate, rtt_ns) / (min_u64(open, 1 << 20) + 1);
    let room = min_u64(room, share);
    let (reply, charged) = if room >= KERNEL_INITIAL_SEGMENTS {
        (0, SENDER_INITIAL_SEGMENTS)
    } else {
        let segs = max_u64(room, FIRST_FLIGHT_MIN_SEGMENTS);
        (segs, min_u64(segs, SENDER_INITIAL_SEGMENTS))
    };
    let charge_ns = charged * SEGMENT_WIRE_BYTES * NS_PER_SEC / rate;
    (reply as u32, min_u64(start + charge_ns, now + 2 * rtt_ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{SOCK_ACKS_HELD, SOCK_SHAPED};

    #[test]
    fn the_path_round_trip_is_the_least_sample_of_the_last_whole_window() {
        let ms = 1_000_000;
        let w = PATH_RTT_WINDOW_NS;
        let p = path_rtt_update(PathRtt::default(), 5_000, 10 * ms);
        assert_eq!(
            p,
            PathRtt {
                rtt_us: 0,
                min_us: 5_000,
                window_ns: 10 * ms
            },
            "the first sample opens a window; no figure before it closes"
        );
        let p = path_rtt_update(p, 40_000, 20 * ms);
        let p = path_rtt_update(p, 3_000, 30 * ms);
        let p = path_rtt_update(p, 9_000, 10 * ms + w - 1);
        assert_eq!((p.rtt_us, p.min_us), (0, 3_000), "still the first window");
        let p = path_rtt_update(p, 41_000, 10 * ms + w);
        assert_eq!(
            p,
            PathRtt {
                rtt_us: 3_000,
                min_us: 41_000,
                window_ns: 10 * ms + w
            },
            "a sample at the window's end closes it"
        );
        // A queue that stays a whole window counts.
        let p = path_rtt_update(p, 45_000, 10 * ms + w + 50 * ms);
        let p = path_rtt_update(p, 42_000, 10 * ms + 2 * w + 5 * ms);
        assert_eq!((p.rtt_us, p.min_us), (41_000, 42_000));
        // An idle gap of many windows keeps the last figure.
        let p = path_rtt_update(p, 2_000, 10 * w);
        assert_eq!((p.rtt_us, p.min_us, p.window_ns), (42_000, 2_000, 10 * w));
        // Samples are at least 1 µs and fit 32 bits.
        let p = path_rtt_update(PathRtt::default(), 0, 1);
        assert_eq!(p.min_us, 1);
        let p = path_rtt_update(p, u64::MAX, 2);
        assert_eq!(p.min_us, 1);
        let p = path_rtt_update(PathRtt::default(), u64::MAX, 1);
        assert_eq!(p.min_us, u32::MAX);
    }

    #[test]
    fn a_path_probe_samples_only_a_busy_flows_answer() {
        let ms = 1_000_000;
        assert_eq!(path_probe_sample(10 * ms, 52 * ms, 1_000, 90_000), 42_000);
        assert_eq!(
            path_probe_sample(10 * ms, 10 * ms, 1_000, 90_000),
            1,
            "at least 1 µs"
        );
        assert_eq!(
            path_probe_sample(10 * ms, 9 * ms, 1_000, 90_000),
            0,
            "answered before it left"
        );
        assert_eq!(
            path_probe_sample(10 * ms, 10 * ms + PATH_PROBE_STALE_NS + 1, 1_000, 90_000),
            0,
            "stale"
        );
        assert_eq!(
            path_probe_sample(10 * ms, 400 * ms, 90_000, 90_000),
            0,
            "the first data after an idle spell"
        );
    }

    #[test]
    fn a_receive_window_covers_the_path_round_trip_where_it_is_longer() {
        assert_eq!(window_rtt_us(500, 0), 500, "not measured");
        assert_eq!(window_rtt_us(500, 300), 500, "shorter than the handshake");
        assert_eq!(window_rtt_us(500, 40_500), 40_500);
        assert_eq!(
            window_rtt_us(500, 10_000_000),
            500 + PATH_RTT_EXTRA_MAX_US,
            "bounded"
        );
        // The ceiling follows: a 25 Mbit/s flow behind a 40 ms queue.
        let rate = 25_000_000 / 8;
        let handshake = window_clamp_ceiling(rate, 500, 1448);
        let path = window_clamp_ceiling(rate, window_rtt_us(500, 40_500), 1448);
        assert!(path > 4 * handshake, "{path} vs {handshake}");
    }

    #[test]
    fn a_flow_idle_for_two_whole_epochs_wakes() {
        assert!(!woke_from_idle(0, 100), "never counted: new, not woken");
        assert!(!woke_from_idle(97, 98));
        assert!(!woke_from_idle(97, 99), "one epoch skipped");
        assert!(woke_from_idle(97, 100), "two epochs skipped");
        assert!(woke_from_idle(97, 101));
        assert!(!woke_from_idle(101, 101));
    }

    #[test]
    fn a_woken_flow_counts_in_full_once_it_moves_two_segments() {
        let other = SOCK_SHAPED | SOCK_ACKS_HELD;
        // Not woken: by use, flags untouched.
        assert_eq!(epoch_count(other, false, false, 1 << 30), (BY_USE, other));
        assert!(!woken_counts_now(other, 1 << 30));
        // Wakes: not counted yet.
        let (w, woken) = epoch_count(other, false, true, 10);
        assert_eq!((w, woken), (0, other | SOCK_WOKEN));
        // A bulk flow crosses two segments within its wake epoch: in full
        // there, once.
        assert!(!woken_counts_now(woken, WOKEN_COUNT_BYTES - 1));
        assert!(woken_counts_now(woken, WOKEN_COUNT_BYTES));
        // A poll moves less: by use at the next epoch, still watched there,
        // then no longer.
        let (w, late) = epoch_count(woken, false, false, 500);
        assert_eq!((w, late), (BY_USE, woken | SOCK_WOKEN_LATE));
        // Counted by its use there: not in full on top of it.
        assert!(!woken_counts_now(late, WOKEN_COUNT_BYTES));
        assert_eq!(epoch_count(late, false, false, 500), (BY_USE, other));
        // Crossing by the next epoch's start counts in full there.
        assert_eq!(
            epoch_count(woken, false, false, WOKEN_COUNT_BYTES),
            (UNIT, other)
        );
        assert_eq!(
            epoch_count(late, false, false, WOKEN_COUNT_BYTES),
            (UNIT, other)
        );
        // A first count (or a byte count that went back) is in full and
        // ends the watch.
        assert_eq!(epoch_count(late, true, false, 0), (UNIT, other));
        assert_eq!(epoch_count(other, true, true, 0), (UNIT, other));
        // Waking again restarts the watch.
        assert_eq!(epoch_count(late, false, true, 0), (0, other | SOCK_WOKEN));
    }

    #[test]
    fn a_young_flow_from_afar_grows_its_window_past_the_round_trip_over_two_seconds() {
        // One of 32 flows sharing 10 Mbit/s from 60 ms away.
        let (target, rtt, mss) = (wire_to_tcp_rate(1_250_000 / 32), 60_000, 1448);
        let full = ack_paced_clamp_ceiling(target, rtt, mss);
        let step = receive_window_clamp(0, 0, target, mss, rtt, rtt, 0);
        assert_eq!(step, full);
        // Starting: its round trip and 10 ms, here the two-segment floor.
        let start = ramped_window_clamp(step, target, rtt, mss, 0);
        assert_eq!(start, window_clamp_ceiling(target, rtt, mss));
        assert_eq!(start, 2 * 1448);
        // Halfway: two of the four segments; from two seconds: all four.
        let half = ramped_window_clamp(step, target, rtt, mss, CLAMP_CEILING_RAMP_NS / 2);
        assert_eq!(half, window_clamp(target, rtt, mss) + 2 * 1448);
        assert_eq!(
            ramped_window_clamp(step, target, rtt, mss, CLAMP_CEILING_RAMP_NS),
            full
        );
        assert_eq!(ramped_window_clamp(step, target, rtt, mss, u64::MAX), full);
        assert!(start < half && half < full);
        // Never above the step's clamp.
        assert_eq!(ramped_window_clamp(1448, target, rtt, mss, u64::MAX), 1448);
        // Near flows follow their measured rate: left as they are.
        assert_eq!(ramped_window_clamp(12_345, target, 9_999, mss, 0), 12_345);
        // A 2 Mbit/s flow (a 14.6 KB round trip): from its round trip plus
        // 10 ms at the start to its round trip plus two segments halfway.
        let mid = wire_to_tcp_rate(250_000);
        let mid_full = ack_paced_clamp_ceiling(mid, rtt, mss);
        assert_eq!(
            ramped_window_clamp(mid_full, mid, rtt, mss, 0),
            window_clamp_ceiling(mid, rtt, mss)
        );
        assert_eq!(
            ramped_window_clamp(mid_full, mid, rtt, mss, CLAMP_CEILING_RAMP_NS / 2),
            window_clamp(mid, rtt, mss) + 2 * 1448
        );
        assert!(window_clamp(mid, rtt, mss) > 2 * 1448);
        assert!(window_clamp_ceiling(mid, rtt, mss) < mid_full);
        // A 10 Mbit/s flow's ceiling is its round trip plus 10 ms from the
        // start.
        let fast = wire_to_tcp_rate(1_250_000);
        let fast_full = ack_paced_clamp_ceiling(fast, rtt, mss);
        assert_eq!(ramped_window_clamp(fast_full, fast, rtt, mss, 0), fast_full);
    }

    #[test]
    fn an_unstarted_flow_from_afar_is_clamped_at_its_share_of_the_class_round_trip() {
        // 10 Mbit/s of wire rate from 60 ms away: 73 KB of payload a round
        // trip, split over the class's open flows, at least two segments.
        let (rate, rtt) = (1_250_000, 60_000);
        let whole = window_clamp(rate, rtt, 1448);
        assert_eq!(
            unstarted_window_clamp(37, 1448, true, rtt, rate, 1),
            Some(whole)
        );
        assert_eq!(
            unstarted_window_clamp(37, 1448, true, rtt, rate, 0),
            Some(whole)
        );
        assert!(whole.abs_diff(4 * window_clamp(rate / 4, rtt, 1448)) < 256);
        assert_eq!(
            unstarted_window_clamp(0, 1448, true, rtt, rate, 4),
            Some(window_clamp(rate / 4, rtt, 1448))
        );
        assert_eq!(
            unstarted_window_clamp(37, 1448, true, rtt, rate, 32),
            Some(2896)
        );
        assert_eq!(
            unstarted_window_clamp(37, 1448, true, rtt, 0, 1),
            Some(2896)
        );
        assert_eq!(
            unstarted_window_clamp(1447, 1448, true, rtt, rate, 32),
            Some(2896)
        );
        // A tiny or absurd segment size is bounded as for the other clamps.
        assert_eq!(unstarted_window_clamp(0, 0, true, rtt, 0, 1), Some(2 * 536));
        // The class's rate: its allocation once it has one.
        let mut cfg = ClassConfig {
            guarantee: 1_000,
            ..Default::default()
        };
        assert_eq!(class_rate(&cfg), 1_000);
        cfg.alloc = 3_000;
        assert_eq!(class_rate(&cfg), 3_000);
        // Started at a segment's worth: the usual clamp.
        assert!(!flow_started(1447, 1448) && flow_started(1448, 1448));
        assert!(!flow_started(535, 0) && flow_started(536, 0));
        assert!(flow_started(65_535, u64::MAX));
        assert_eq!(
            unstarted_window_clamp(37 + 1448, 1448, true, rtt, rate, 32),
            None
        );
        assert_eq!(
            unstarted_window_clamp(u64::MAX, 1448, true, rtt, rate, 1),
            None
        );
        // Without ACK pacing: never.
        assert_eq!(unstarted_window_clamp(0, 1448, false, rtt, rate, 32), None);
        assert_eq!(unstarted_window_clamp(0, 1448, false, 200, rate, 32), None);
        // A near ACK-paced flow grows each clamp from its last: not there.
        let near = CLAMP_FOLLOWS_CLOCK_RTT_US;
        assert_eq!(
            unstarted_window_clamp(0, 1448, true, near - 1, rate, 32),
            None
        );
        assert_eq!(
            unstarted_window_clamp(0, 1448, true, near, rate, 32),
            Some(2896)
        );
    }

    #[test]
    fn first_flight_grants_are_the_room_left_and_their_charges_stay_within_it() {
        // 8 Mbit/s, 60 ms: 60 000 bytes, 39 segments of room.
        let (rate, rtt, now) = (1_000_000, 60_000, 5 * NS_PER_SEC);
        let mut clock = 0;
        let mut replies = [0; 8];
        for r in &mut replies {
            (*r, clock) = first_flight(clock, now, rate, rtt, 0);
        }
        // The first flows get what is left (each charged ten segments, a
        // sender's usual initial window), the rest two each.
        assert_eq!(replies, [39, 29, 19, 9, 2, 2, 2, 2]);
        // Drained at the class's rate, the room comes back.
        assert_eq!(first_flight(clock, now + NS_PER_SEC, rate, rtt, 0).0, 39);
        // A class with room for the kernel's window leaves it.
        assert_eq!(first_flight(0, now, 10 * rate, rtt, 0).0, 0);
        // The clock never runs more than two round trips ahead.
        for _ in 0..1000 {
            (_, clock) = first_flight(clock, now, rate, rtt, 0);
        }
        assert_eq!(clock, now + 2 * 60_000_000);
        // No rate: the kernel's window, clock untouched.
        assert_eq!(first_flight(77, now, 0, rtt, 0), (0, 77));
        // Connections opened one by one while the clock drains: each gets
        // the round trip's worth split over the class's open flows and
        // itself (39 segments: 39, 19, 13, 9, 7, ... down to two).
        let mut clock = 0;
        let replies: Vec<u32> = (0..24u64)
            .map(|open| {
                let t = now + open * NS_PER_SEC;
                let r;
                (r, clock) = first_flight(clock, t, rate, rtt, open);
                r
            })
            .collect();
        assert_eq!(&replies[..8], &[39, 19, 13, 9, 7, 6, 5, 4]);
        assert_eq!(replies[19..], [2; 5]);
        // No round trip yet: 100 ms assumed (a 1 Mbit/s class has room for
        // eight segments).
        assert_eq!(first_flight(0, now, 125_000, 0, 0).0, 8);
        // A tiny class still lets two segments in.
        assert_eq!(first_flight(0, now, 1_250, rtt, 0).0, 2);
        // The largest rates and round trips do not overflow.
        assert_eq!(first_flight(0, now, u64::MAX, u64::MAX, u64::MAX).0, 7);
        assert_eq!(first_flight(u64::MAX / 4, now, u64::MAX, u64::MAX, 0).0, 2);
    }

    #[test]
    fn an_ack_paced_window_from_afar_is_its_ceiling() {
        let (mss, target) = (1448, 250_000);
        let ceiling_60ms = ack_paced_clamp_ceiling(target, 60_000, mss);
        // A slow flow's ceiling leaves four segments beyond its round trip
        // (10 ms at 2 Mbit/s is under two); a fast one's 10 ms.
        assert_eq!(
            ceiling_60ms,
            window_clamp(target, 60_000, mss) + CLAMP_CEILING_SEGMENTS * mss
        );
        assert!(ceiling_60ms > window_clamp_ceiling(target, 60_000, mss));
        assert_eq!(
            ack_paced_clamp_ceiling(12_500_000, 60_000, mss),
            window_clamp_ceiling(12_500_000, 60_000, mss)
        );
        // From 10 ms on, an ACK-paced flow's clamp is its ceiling whatever
        // it received: a burst four times the target does not halve it,
        // nothing received does not freeze it, the first step starts there.
        for (clamp, measured) in [(5_000, 1_000_000), (5_000, 0), (0, 0), (40_000, 250_000)] {
            assert_eq!(
                receive_window_clamp(clamp, measured, target, mss, 60_000, 60_000, 9_000),
                ceiling_60ms
            );
        }
        assert_eq!(
            receive_window_clamp(5_000, 0, target, mss, CLAMP_FOLLOWS_CLOCK_RTT_US, 90_000, 0),
            ack_paced_clamp_ceiling(target, CLAMP_FOLLOWS_CLOCK_RTT_US, mss),
            "the handshake's round trip sets a far flow's ceiling"
        );
        // Closer, it follows the measured rate (up to its ceiling). A path
        // round trip longer than the handshake's sizes that ceiling only.
        for (rtt, window_rtt) in [
            (
                CLAMP_FOLLOWS_CLOCK_RTT_US - 1,
                CLAMP_FOLLOWS_CLOCK_RTT_US - 1,
            ),
            (500, 40_500),
        ] {
            for (clamp, measured, initial) in
                [(20_000, 1_000_000, 0), (20_000, 100_000, 0), (0, 0, 9_000)]
            {
                let ceiling = ack_paced_clamp_ceiling(target, window_rtt, mss);
                assert_eq!(
                    receive_window_clamp(clamp, measured, target, mss, rtt, window_rtt, initial),
                    next_window_clamp(clamp, measured, target, mss, ceiling, initial),
                    "rtt {rtt} window {window_rtt} clamp {clamp} measured {measured}"
                );
            }
        }
    }

    #[test]
    fn unpaced_windows_share_one_queue_in_proportion() {
        let mss = 1448;
        let gbit = 125_000_000;
        let q = shared_queue_us(SHARED_QUEUE_BYTES, gbit);
        assert_eq!(q, 1_048);
        assert_eq!(shared_queue_us(SHARED_QUEUE_BYTES, 10 * gbit), 104);
        assert_eq!(
            shared_queue_us(SHARED_QUEUE_BYTES, 100 * gbit),
            SHARED_QUEUE_MIN_US
        );
        assert_eq!(
            shared_queue_us(SHARED_QUEUE_BYTES, gbit / 100),
            SHARED_QUEUE_MAX_US
        );
        assert_eq!(shared_queue_us(SHARED_QUEUE_BYTES, 0), SHARED_QUEUE_MAX_US);
        // Half of a 64 KB buffer; any size without overflow.
        assert_eq!(shared_queue_us(32 * 1024, gbit), 262);
        assert_eq!(shared_queue_us(u64::MAX, gbit), SHARED_QUEUE_MAX_US);
        // The shares of all-busy at 1 Gbit/s on a veth (5 µs): windows in
        // proportion to the shares, adding up to about the queue's bytes.
        let w: Vec<u64> = [1, 3, 6]
            .iter()
            .map(|tenth| unpaced_window_clamp(tenth * gbit / 10, UNIT, 5, q, mss))
            .collect();
        let sum: u64 = w.iter().sum();
        assert!(
            sum.abs_diff(SHARED_QUEUE_BYTES * 1480 / 1514) < 2_000,
            "{sum}"
        );
        for (tenth, win) in [(3, w[1]), (6, w[2])] {
            assert!(win.abs_diff(tenth * w[0]) <= tenth, "{w:?}");
        }
        // A smaller queue (a 64 KB buffer upstream): windows adding up to it.
        let small = shared_queue_us(32 * 1024, gbit);
        let sum: u64 = [1, 3, 6]
            .iter()
            .map(|tenth| unpaced_window_clamp(tenth * gbit / 10, UNIT, 5, small, mss))
            .sum();
        assert!(sum.abs_diff(32 * 1024 * 1480 / 1514) < 2_000, "{sum}");
        // Out-of-range queue times are bounded.
        assert_eq!(unpaced_window_time_us(0, 0), SHARED_QUEUE_MIN_US);
        // The round trip adds the flow's own path; the floor is two segments.
        assert_eq!(
            unpaced_window_clamp(gbit, UNIT, 60_000, q, mss),
            window_clamp(gbit, 61_048, mss)
        );
        assert_eq!(unpaced_window_clamp(0, UNIT, 5, q, mss), 2 * mss);
        // A round trip up to the queue's time is taken for queueing, one
        // past twice it for a far path; between them the time is continuous.
        assert_eq!(unpaced_window_time_us(0, q), 1_048);
        assert_eq!(unpaced_window_time_us(777, q), 1_048);
        assert_eq!(unpaced_window_time_us(1_048, q), 1_048);
        assert_eq!(unpaced_window_time_us(1_500, q), 1_952);
        assert_eq!(unpaced_window_time_us(2_096, q), 3_144);
        assert_eq!(unpaced_window_time_us(60_000, q), 61_048);
        let mut last = 0;
        for rtt in 0..5_000 {
            let t = unpaced_window_time_us(rtt, q);
            assert!(t >= last && t >= 1_048 && t <= rtt + 1_048, "{rtt}: {t}");
            last = t;
        }
        // A multiplier widens or narrows the window, within its bounds.
        let base = unpaced_window_clamp(gbit / 10, UNIT, 5, q, mss);
        let narrow = unpaced_window_clamp(gbit / 10, UNIT / 2, 5, q, mss);
        assert!(narrow.abs_diff(base / 2) <= 2, "{narrow} {base}");
        // Below the pacing multiplier's bound, down to the window's floor
        // (a held class's windows, netqos `held_window_mult`).
        let full = unpaced_window_clamp(gbit, UNIT, 5, q, mss);
        let narrowest = unpaced_window_clamp(gbit, WINDOW_MULT_FLOOR, 5, q, mss);
        assert!(narrowest.abs_diff(full / 8) <= 2, "{narrowest} {full}");
        assert_eq!(unpaced_window_clamp(gbit, 0, 5, q, mss), narrowest);
        assert_eq!(
            unpaced_window_clamp(gbit, WINDOW_MULT_FLOOR / 2, 5, q, mss),
            narrowest
        );
        // Never below two segments.
        assert_eq!(
            unpaced_window_clamp(gbit / 10, WINDOW_MULT_FLOOR, 5, q, mss),
            2 * mss
        );
        let wide = unpaced_window_clamp(gbit / 10, 2 * UNIT, 5, q, mss);
        assert!(wide.abs_diff(2 * base) <= 2, "{wide} {base}");
        assert_eq!(
            unpaced_window_clamp(gbit / 10, u64::MAX, 5, q, mss),
            unpaced_window_clamp(gbit / 10, MULT_MAX, 5, q, mss)
        );
        assert_eq!(
            unpaced_window_clamp(u64::MAX, u64::MAX, u64::MAX, u64::MAX, mss),
            window_clamp(MAX_RATE * 4, 10_000_000 + SHARED_QUEUE_MAX_US, mss)
        );
    }

    #[test]
    fn window_clamp_steps_towards_the_target_rate() {
        let mss = 1448;
        let floor = 2 * mss;
        let ceiling = window_clamp_ceiling(12_500_000, 0, mss);
        let start = next_window_clamp(0, 0, 12_500_000, mss, ceiling, 50_000);
        assert_eq!(start, 50_000);
        // Twice too fast: halved. Four times too fast: halved (bounded step).
        assert_eq!(
            next_window_clamp(40_000, 25_000_000, 12_500_000, mss, ceiling, 0),
            20_000
        );
        assert_eq!(
            next_window_clamp(40_000, 50_000_000, 12_500_000, mss, ceiling, 0),
            20_000
        );
        // Slightly slow: opened in proportion.
        assert_eq!(
            next_window_clamp(40_000, 10_000_000, 12_500_000, mss, ceiling, 0),
            50_000
        );
        // Nothing received: unchanged.
        assert_eq!(
            next_window_clamp(40_000, 0, 12_500_000, mss, ceiling, 0),
            40_000
        );
        // Bounds: two segments, target × (round trip + 10 ms).
        assert_eq!(
            next_window_clamp(floor, 1_000_000_000, 12_500_000, mss, ceiling, 0),
            floor
        );
        assert_eq!(ceiling, window_clamp(12_500_000, 10_000, mss));
        assert_eq!(window_clamp_ceiling(0, 60_000, mss), floor);
        assert_eq!(
            next_window_clamp(ceiling, 1, 12_500_000, mss, ceiling, 0),
            ceiling
        );
        assert_eq!(
            next_window_clamp(0, 0, 12_500_000, mss, ceiling, u64::MAX),
            ceiling
        );
        // A download from 60 ms away may open to its round trip + 10 ms,
        // and the ceiling stays put under absurd round trips.
        let far = window_clamp_ceiling(12_500_000, 60_000, mss);
        assert_eq!(far, window_clamp(12_500_000, 70_000, mss));
        assert_eq!(
            next_window_clamp(far / 2 + 1, 1, 12_500_000, mss, far, 0),
            far
        );
        assert_eq!(
            window_clamp_ceiling(12_500_000, u64::MAX / 2, mss),
            window_clamp(12_500_000, 10_010_000, mss)
        );
        // Converges from anywhere within a few steps.
        let mut c = ceiling;
        for _ in 0..12 {
            // A flow whose rate is clamp / 1 ms.
            let measured = c * 1_000;
            c = next_window_clamp(c, measured, 12_500_000, mss, ceiling, 0);
        }
        assert!(c.abs_diff(12_500) < 200, "{c}");
    }

    #[test]
    fn pacing_gains_shrink_with_the_round_trip_past_30_ms() {
        assert_eq!(rtt_gain(768, 0), 768);
        assert_eq!(rtt_gain(768, 150), 768);
        assert_eq!(rtt_gain(768, RTT_GAIN_FULL_US), 768);
        assert_eq!(rtt_gain(768, 60_000), 384);
        assert_eq!(rtt_gain(5 * UNIT, 120_000), 5 * UNIT / 4);
        // Absurd inputs stay finite and positive.
        assert_eq!(
            rtt_gain(u64::MAX, u64::MAX),
            (1 << 22) * 30_000 / 10_000_000
        );
        assert!(rtt_gain(1 << 20, u64::MAX) > 0);
    }

    #[test]
    fn a_class_round_trip_is_its_longest_flows_and_decays() {
        assert_eq!(class_rtt(0, 60_000), 60_000);
        assert_eq!(class_rtt(60_000, 100), 56_250);
        assert_eq!(class_rtt(60_000, 70_000), 70_000);
        // Alone, a veth flow brings a 60 ms class below 30 ms within 11
        // steps; flows 60 ms away in the class keep it there.
        let mut rtt = 60_000;
        for _ in 0..11 {
            rtt = class_rtt(rtt, 100);
        }
        assert!(rtt < RTT_GAIN_FULL_US, "{rtt}");
        assert_eq!(class_rtt(rtt, 60_000), 60_000);
        assert_eq!(class_rtt(u64::MAX, 0), u64::MAX - u64::MAX / 16);
    }

    #[test]
    fn the_clamp_a_received_rate_reflects_is_the_previous_one_past_short_round_trips() {
        // A veth or rack round trip: the rate shows the newest clamp.
        assert_eq!(clamp_seen(10, 20, 30), 10);
        assert_eq!(clamp_seen(10, 20, 9_999), 10);
        // From half a step on, the one before.
        assert_eq!(clamp_seen(10, 20, 10_000), 20);
        assert_eq!(clamp_seen(10, 20, 60_000), 20);
        assert_eq!(clamp_seen(10, 20, u64::MAX), 20);
        // No previous clamp yet.
        assert_eq!(clamp_seen(10, 0, 60_000), 10);
    }

    #[test]
    fn the_window_clamp_steps_once_per_round_trip_between_20_and_80_ms() {
        assert_eq!(clamp_step_ns(0), CLAMP_STEP_NS);
        assert_eq!(clamp_step_ns(150), CLAMP_STEP_NS);
        assert_eq!(clamp_step_ns(20_000), CLAMP_STEP_NS);
        assert_eq!(clamp_step_ns(60_000), 60_000_000);
        assert_eq!(clamp_step_ns(200_000), CLAMP_STEP_MAX_NS);
        assert_eq!(clamp_step_ns(u64::MAX), CLAMP_STEP_MAX_NS);
    }

    /// A flow 60 ms away whose window is 40 % over what its target needs
    /// (the target fell), the received rate following the clamp a round
    /// trip late (a model of the loop: the flow window-limited, no noise).
    #[test]
    fn a_clamp_scaled_from_the_one_its_rate_reflects_settles_a_round_trip_late() {
        let (mss, rtt_us, wire_target) = (1448, 60_000, 1_500_000);
        let needed = window_clamp(wire_target, rtt_us, mss);
        let target = wire_to_tcp_rate(wire_target);
        // Clamps from the first step on; (lowest, highest) after it.
        let run = |step_ns: u64, scale: &dyn Fn(u64, u64) -> u64| {
            let delay = (rtt_us * 1_000 / step_ns) as usize;
            let mut clamps = vec![needed * 14 / 10; delay + 1];
            for _ in 0..100 {
                // Payload bytes/s of the window in force a round trip ago.
                let seen = clamps[clamps.len() - 1 - delay];
                let measured = seen * 1_000_000 / rtt_us;
                let (now, before) = (clamps[clamps.len() - 1], clamps[clamps.len() - 2]);
                let clamp = scale(now, before);
                clamps.push(next_window_clamp(
                    clamp,
                    measured,
                    target,
                    mss,
                    window_clamp_ceiling(target, rtt_us, mss),
                    0,
                ));
            }
            let settled = &clamps[delay + 1..];
            (
                *settled.iter().min().unwrap(),
                *settled[20..].iter().max().unwrap(),
            )
        };
        // The newest clamp scaled every 20 ms sinks to about a third of the
        // window the target needs; scaled every round trip, to 0.7. Both
        // keep swinging.
        let newest = |now: u64, _| now;
        let (low, high) = run(CLAMP_STEP_NS, &newest);
        assert!(
            low < needed * 4 / 10 && high > needed * 11 / 10,
            "{low} {high}"
        );
        let (low, high) = run(clamp_step_ns(rtt_us), &newest);
        assert!(
            low < needed * 8 / 10 && high > needed * 11 / 10,
            "{low} {high}"
        );
        // The clamp the rate reflects, once per round trip: settles at once.
        let seen = |now, before| clamp_seen(now, before, rtt_us);
        let (low, high) = run(clamp_step_ns(rtt_us), &seen);
        assert!(low.abs_diff(needed) * 100 <= needed, "{low} vs {needed}");
        assert!(high.abs_diff(needed) * 100 <= needed, "{high} vs {needed}");
    }

    #[test]
    fn window_clamp_is_rate_times_rtt_with_a_two_segment_floor() {
        // 100 Mbit/s wire over 1 ms: 12.5 MB/s × 1 ms of payload.
        let c = window_clamp(12_500_000, 1_000, 1448);
        assert_eq!(c, wire_to_tcp_rate(12_500_000) / 1_000);
        // Microsecond RTTs: two segments.
        assert_eq!(window_clamp(12_500_000, 20, 1448), 2 * 1448);
        // Unknown MSS: the IPv4 minimum.
        assert_eq!(window_clamp(1, 1, 0), 2 * 536);
        // Absurd inputs stay finite and positive.
        let huge = window_clamp(u64::MAX, u64::MAX, u64::MAX);
        assert!(huge > 0 && huge <= u32::MAX as u64 / 2);
        // Monotone in rate and RTT.
        assert!(window_clamp(25_000_000, 1_000, 1448) > c);
        assert!(window_clamp(12_500_000, 2_000, 1448) > c);
    }
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            priority: 0,
            has_ceil: false,
            prio_step: 1000,
            extra_watermark: 50_000,
            mark_debt: 10_000,
            drop_debt: 100_000,
            flow: FlowKind::default(),
        }
    }

    /// `lim` for packets of a flow of kind `flow`.
    fn of(lim: Limits, flow: FlowKind) -> Limits {
        Limits { flow, ..lim }
    }

    #[test]
    fn earned_is_rate_times_time() {
        assert_eq!(earned(NS_PER_SEC / 10, 1_250_000), 125_000);
        assert_eq!(earned(1, 1_000_000_000), 1);
        assert_eq!(earned(0, MAX_RATE), 0);
    }

    #[test]
    fn earned_caps_time_and_rate() {
        assert_eq!(earned(10 * NS_PER_SEC, 1000), 1000);
        assert_eq!(earned(u64::MAX, u64::MAX), MAX_RATE);
    }

    #[test]
    fn overflow_and_underflow_corrections() {
        assert_eq!(overflow_correction(150, 100), -50);
        assert_eq!(overflow_correction(100, 100), 0);
        assert_eq!(overflow_correction(-5, 100), 0);
        assert_eq!(underflow_correction(-150, 100), 50);
        assert_eq!(underflow_correction(-100, 100), 0);
        assert_eq!(underflow_correction(20, 100), 0);
        assert_eq!(overflow_correction(i64::MAX, u64::MAX), 0);
    }

    #[test]
    fn wire_len_adds_headers_of_extra_segments() {
        assert_eq!(wire_len(1514, 1, 66), 1514);
        assert_eq!(wire_len(1514, 0, 66), 1514);
        // 45 segments of 1448 payload + one 66-byte header = 65226 bytes.
        assert_eq!(wire_len(66 + 45 * 1448, 45, 66), 45 * 1514);
    }

    #[test]
    fn own_tokens_come_first() {
        let l = Levels {
            own: 1,
            borrow: 0,
            ceil: 0,
            pool: -1_000_000,
        };
        assert_eq!(decide(&l, &limits(), 65_000), Verdict::Own);
    }

    #[test]
    fn borrowing_needs_allowance_and_pool_above_priority_threshold() {
        let mut lim = limits();
        lim.priority = 3; // needs pool > 3000
        let mut l = Levels {
            own: 0,
            borrow: 10,
            ceil: 0,
            pool: 3001,
        };
        assert_eq!(decide(&l, &lim, 1500), Verdict::Borrow);
        l.pool = 3000;
        assert_eq!(decide(&l, &lim, 1500), Verdict::Over);
        l.pool = 3001;
        l.borrow = 0;
        assert_eq!(decide(&l, &lim, 1500), Verdict::Over);
    }

    #[test]
    fn higher_priority_borrows_at_lower_pool_levels() {
        let mut hi = limits();
        hi.priority = 0;
        let mut lo = limits();
        lo.priority = 5;
        let l = Levels {
            own: 0,
            borrow: 100,
            ceil: 0,
            pool: 2000,
        };
        assert_eq!(decide(&l, &hi, 1500), Verdict::Borrow);
        assert_eq!(decide(&l, &lo, 1500), Verdict::Over);
    }

    #[test]
    fn unclaimed_capacity_is_borrowed_beyond_allowance() {
        let l = Levels {
            own: -5,
            borrow: 0,
            ceil: 0,
            pool: 50_001,
        };
        assert_eq!(decide(&l, &limits(), 1500), Verdict::BorrowExtra);
        let l = Levels { pool: 50_000, ..l };
        assert_eq!(decide(&l, &limits(), 1500), Verdict::Over);
    }

    #[test]
    fn ceiling_stops_all_borrowing() {
        let mut lim = limits();
        lim.has_ceil = true;
        let l = Levels {
            own: 0,
            borrow: 100,
            ceil: 0,
            pool: 1_000_000,
        };
        assert_eq!(decide(&l, &lim, 1500), Verdict::Over);
        let l = Levels { ceil: 1, ..l };
        assert_eq!(decide(&l, &lim, 1500), Verdict::Borrow);
    }

    #[test]
    fn debt_decides_between_pass_mark_and_drop() {
        let lim = limits();
        let l = Levels {
            own: -8_000,
            borrow: 0,
            ceil: 0,
            pool: 0,
        };
        assert_eq!(decide(&l, &lim, 1500), Verdict::Over); // 9_500
        assert_eq!(decide(&l, &lim, 2500), Verdict::OverMark); // 10_500
        let l = Levels { own: -99_000, ..l };
        assert_eq!(decide(&l, &lim, 1000), Verdict::OverMark); // exactly 100_000
        assert_eq!(decide(&l, &lim, 1001), Verdict::Drop);
        let paced = of(
            lim,
            FlowKind {
                paced: true,
                ..lim.flow
            },
        );
        assert_eq!(decide(&l, &paced, 1001), Verdict::OverMark);
        assert_eq!(
            decide(&Levels { own: -50_000, ..l }, &paced, 1000),
            Verdict::Over
        );
        let deep = Levels { own: -399_000, ..l };
        assert_eq!(decide(&deep, &paced, 1000), Verdict::OverMark);
        assert_eq!(decide(&deep, &paced, 1001), Verdict::Drop);
        // ECN without pacing: marked as early as an unpaced flow, dropped as
        // late as a paced one.
        let ecn = of(
            lim,
            FlowKind {
                answers_marks: true,
                ..lim.flow
            },
        );
        let shallow = Levels { own: -8_000, ..l };
        assert_eq!(decide(&shallow, &ecn, 1500), Verdict::Over);
        assert_eq!(decide(&shallow, &ecn, 2500), Verdict::OverMark);
        assert_eq!(decide(&l, &ecn, 1001), Verdict::OverMark);
        assert_eq!(decide(&deep, &ecn, 1000), Verdict::OverMark);
        assert_eq!(decide(&deep, &ecn, 1001), Verdict::Drop);
        // Held by its window: charged up to the drop threshold, never
        // marked, then passes uncharged however deep the debt, ECN or not.
        for answers_marks in [false, true] {
            let window = of(
                lim,
                FlowKind {
                    window_bound: true,
                    answers_marks,
                    ..lim.flow
                },
            );
            assert_eq!(decide(&shallow, &window, 2500), Verdict::Over);
            assert_eq!(decide(&l, &window, 1000), Verdict::Over);
            assert_eq!(decide(&l, &window, 1001), Verdict::OverUncharged);
            assert_eq!(
                decide(
                    &Levels {
                        own: -i64::MAX,
                        ..l
                    },
                    &window,
                    1500
                ),
                Verdict::OverUncharged
            );
            assert_eq!(decide(&Levels { own: 1, ..l }, &window, 1500), Verdict::Own);
            // Past its ceiling, the ceiling's debt decides, whatever the
            // own bucket's.
            let capped = Limits {
                has_ceil: true,
                ..window
            };
            // ... but for packets without payload, never dropped.
            let ack = of(
                capped,
                FlowKind {
                    no_payload: true,
                    ..capped.flow
                },
            );
            let far_past = Levels {
                own: -1_000_000,
                ceil: -1_000_000,
                ..l
            };
            assert_eq!(decide(&far_past, &ack, 60), Verdict::OverUncharged);
            for own in [-i64::MAX, -1_000_000, -99_000, 0] {
                let at = |ceil: i64| Levels { own, ceil, ..l };
                assert_eq!(
                    decide(&at(1), &capped, 1001),
                    decide(&Levels { own, ..l }, &window, 1001)
                );
                let pass = |mark| Verdict::PastCeiling { mark };
                assert_eq!(decide(&at(0), &capped, 10_000), pass(false));
                assert_eq!(decide(&at(-12_600), &capped, 1000), pass(true));
                assert_eq!(decide(&at(-91_000), &capped, 1000), pass(true));
                let deeper = 399_000;
                assert_eq!(decide(&at(-deeper), &capped, 1000), pass(true));
                assert_eq!(decide(&at(-deeper), &capped, 1001), Verdict::Drop);
                // Without ECN, one drop per 64 KiB of debt growth (a quarter
                // of the mark threshold is less).
                let spaced = |before: i64, len: u64| {
                    let v = decide(&at(-before), &capped, len);
                    if answers_marks {
                        assert_ne!(v, Verdict::DropCharged);
                        None
                    } else {
                        Some(v == Verdict::DropCharged)
                    }
                };
                if !answers_marks {
                    assert_eq!(spaced(8_000, 2_001), Some(false));
                    assert_eq!(spaced(60_000, 5_535), Some(false));
                    assert_eq!(spaced(60_000, 5_536), Some(true));
                    assert_eq!(spaced(65_536, 65_535), Some(false));
                    assert_eq!(spaced(65_536, 65_536), Some(true));
                } else {
                    spaced(60_000, 5_536);
                }
            }
        }
    }

    #[test]
    fn spaced_drops_are_a_gso_aggregate_apart_at_least() {
        assert_eq!(spaced_drop_step(0), SPACED_DROP_MIN_STEP);
        assert_eq!(spaced_drop_step(16_384), SPACED_DROP_MIN_STEP);
        assert_eq!(spaced_drop_step(4 * 65_536), 65_536);
        assert_eq!(spaced_drop_step(1_000_000), 250_000);
    }

    #[test]
    fn debt_is_repaid_from_the_borrow_allowance() {
        assert_eq!(debt_repayment(-500, 200), 200);
        assert_eq!(debt_repayment(-500, 900), 500);
        assert_eq!(debt_repayment(-500, 0), 0);
        assert_eq!(debt_repayment(-500, -10), 0);
        assert_eq!(debt_repayment(0, 900), 0);
        assert_eq!(debt_repayment(10, 900), 0);
        assert_eq!(debt_repayment(i64::MIN, i64::MAX), i64::MAX);
        assert_eq!(debt_repayment(-i64::MAX, i64::MAX), i64::MAX);
    }

    #[test]
    fn a_packet_without_payload_is_never_dropped() {
        let ack = of(
            limits(),
            FlowKind {
                no_payload: true,
                ..FlowKind::default()
            },
        );
        let l = Levels {
            own: -99_000,
            borrow: 0,
            ceil: 0,
            pool: 0,
        };
        // Below the mark threshold (10_000) it is charged like any other
        // packet.
        assert_eq!(
            decide(&Levels { own: -5_000, ..l }, &ack, 66),
            Verdict::Over
        );
        assert_eq!(
            decide(&Levels { own: -9_934, ..l }, &ack, 66),
            Verdict::Over
        );
        // Past it, it passes uncharged where data would be marked or
        // dropped; paced (mark threshold = drop threshold) or not.
        assert_eq!(
            decide(&Levels { own: -9_935, ..l }, &ack, 66),
            Verdict::OverUncharged
        );
        assert_eq!(decide(&l, &ack, 1001), Verdict::OverUncharged);
        let deep = Levels {
            own: -i64::MAX,
            ..l
        };
        assert_eq!(decide(&deep, &ack, 66), Verdict::OverUncharged);
        let paced_ack = of(
            ack,
            FlowKind {
                paced: true,
                ..ack.flow
            },
        );
        assert_eq!(decide(&l, &paced_ack, 66), Verdict::Over);
        assert_eq!(decide(&deep, &paced_ack, 66), Verdict::OverUncharged);
        // Within profile nothing changes.
        assert_eq!(decide(&Levels { own: 1, ..l }, &ack, 66), Verdict::Own);
    }

    #[test]
    fn fill_ratio_is_clamped_and_signed() {
        assert_eq!(fill_ratio(50, 100), 512);
        assert_eq!(fill_ratio(-50, 100), -512);
        assert_eq!(fill_ratio(500, 100), 1024);
        assert_eq!(fill_ratio(i64::MIN, 100), -1024);
        assert_eq!(fill_ratio(7, 0), 0);
    }

    fn fill_cfg(depth: u64, borrow_depth: u64, borrow_rate: u64, guarantee: u64) -> ClassConfig {
        ClassConfig {
            depth,
            borrow_depth,
            borrow_rate,
            guarantee,
            ..ClassConfig::default()
        }
    }

    #[test]
    fn class_fill_reads_the_bucket_that_matters() {
        // No borrowing: the own bucket.
        assert_eq!(class_fill(500, 999, &fill_cfg(1000, 100, 0, 50)), 512);
        // Borrowing, own spent: the borrow bucket says whether the
        // allowance is used.
        assert_eq!(class_fill(-10, 100, &fill_cfg(1000, 100, 5, 50)), 1024);
        assert_eq!(class_fill(0, 0, &fill_cfg(1000, 100, 5, 50)), 0);
        // Own tokens left over count too.
        assert_eq!(class_fill(500, 0, &fill_cfg(1000, 100, 5, 50)), 512);
        // Debt wins.
        assert_eq!(class_fill(-500, 100, &fill_cfg(1000, 100, 5, 50)), -512);
        // A negligible allowance is ignored.
        assert_eq!(class_fill(0, -100, &fill_cfg(1000, 100, 1, 50)), 0);
    }

    #[test]
    fn projected_level_adds_what_the_bucket_earned_up_to_its_depth() {
        // 10 ms at 1000 bytes/s: 10 bytes.
        assert_eq!(projected_level(-50, 10_000_000, 1000, 100), -40);
        assert_eq!(projected_level(95, 10_000_000, 1000, 100), 100);
        assert_eq!(projected_level(5, 0, 1000, 100), 5);
        // A refill covers at most a second; extremes do not overflow.
        assert_eq!(
            projected_level(0, u64::MAX, MAX_RATE, u64::MAX),
            MAX_RATE as i64
        );
        assert_eq!(
            projected_level(i64::MAX, u64::MAX, u64::MAX, u64::MAX),
            i64::MAX
        );
        assert_eq!(projected_level(i64::MIN, 0, 0, 0), i64::MIN);
    }

    #[test]
    fn class_fill_between_packets_sees_the_refill_the_stored_level_misses() {
        // 30 Mbit/s at its guarantee, 75 KB deep (20 ms), one 68 KB GSO
        // packet every 20 ms: right after a charge the stored level is 7 KB
        // (9 %, under the target); 10 ms later the bucket holds half its depth.
        let cfg = fill_cfg(75_000, 32_768, 0, 3_750_000);
        let stored = 75_000 - 68_000;
        assert!(class_fill(stored, 0, &cfg) < FILL_TARGET);
        assert_eq!(
            class_fill_at(stored, 0, 0, &cfg),
            class_fill(stored, 0, &cfg)
        );
        let later = class_fill_at(stored, 0, 10_000_000, &cfg);
        assert_eq!(later, fill_ratio(stored + 37_500, 75_000));
        assert!(later > FILL_TARGET);
        // Idle long enough: full, never past the depth.
        assert_eq!(class_fill_at(stored, 0, NS_PER_SEC, &cfg), UNIT as i64);
        // The borrow bucket is projected at the borrow rate.
        let borrower = fill_cfg(1000, 100, 1000, 50);
        assert_eq!(class_fill_at(-10, 0, 0, &borrower), 0);
        assert_eq!(class_fill_at(-10, 0, 50_000_000, &borrower), 512);
    }

    #[test]
    fn the_loop_reads_a_bucket_halfway_through_its_last_charge() {
        assert_eq!(mid_charge_level(-100, 300), 50);
        assert_eq!(mid_charge_level(7, 0), 7);
        assert_eq!(mid_charge_level(i64::MAX, u64::MAX), i64::MAX);
        assert_eq!(
            mid_charge_level(i64::MIN, u64::MAX),
            i64::MIN + i64::MAX / 2
        );
        // The overflowing 30 Mbit/s class of the 6.1 VM: after a 68 KB
        // charge its full 75 KB bucket holds 7 KB, under the target; read
        // halfway through the charge it is over it, so its flows speed up.
        let cfg = fill_cfg(75_000, 32_768, 0, 3_750_000);
        assert!(class_fill(75_000 - 68_000, 0, &cfg) < FILL_TARGET);
        let fill = class_fill_mid_charge(75_000 - 68_000, 68_000, 0, &cfg);
        assert_eq!(fill, fill_ratio(41_000, 75_000));
        assert!(next_multiplier(UNIT, fill, 5 * UNIT, 5_000_000, true) > UNIT);
        // At its rate, a tooth from -34 KB to 34 KB averages 0: the loop
        // sees the tooth's middle, not its bottom.
        assert_eq!(class_fill_mid_charge(-34_000, 68_000, 0, &cfg), 0);
        // The borrow bucket is read as it is.
        let borrower = fill_cfg(1000, 100, 1000, 50);
        assert_eq!(
            class_fill_mid_charge(-10, 0, -50, &borrower),
            class_fill(-10, -50, &borrower)
        );
        assert_eq!(class_fill_mid_charge(-10, 0, 50, &borrower), 512);
    }

    #[test]
    fn multiplier_integrates_fill_and_stays_bounded() {
        // Error of a full depth for 10 ms at ki = 5/s: 5 % per 10 ms.
        let m = next_multiplier(UNIT, 1024 + FILL_TARGET, 5 * UNIT, 10_000_000, true);
        assert_eq!(m, UNIT + UNIT / 20);
        let m = next_multiplier(UNIT, -1024 + FILL_TARGET, 5 * UNIT, 10_000_000, true);
        assert_eq!(m, UNIT - UNIT / 20);
        assert_eq!(
            next_multiplier(UNIT, FILL_TARGET, 5 * UNIT, 10_000_000, true),
            UNIT
        );
        assert!(next_multiplier(UNIT, 0, 5 * UNIT, 10_000_000, true) < UNIT);
        assert_eq!(
            next_multiplier(MULT_MAX, 1024, 1 << 20, u64::MAX, true),
            MULT_MAX
        );
        assert_eq!(
            next_multiplier(MULT_MIN, -1024, 1 << 20, u64::MAX, true),
            MULT_MIN
        );
        assert_eq!(next_multiplier(0, 0, 0, 0, true), MULT_MIN);
    }

    #[test]
    fn multiplier_rises_only_while_held() {
        // Buckets filling while the flows are not held (slow start): no
        // wind-up.
        assert_eq!(
            next_multiplier(UNIT, 1024, 5 * UNIT, 10_000_000, false),
            UNIT
        );
        // It still falls, held or not.
        assert_eq!(
            next_multiplier(UNIT, -1024 + FILL_TARGET, 5 * UNIT, 10_000_000, false),
            UNIT - UNIT / 20
        );
        // And stays within bounds when it does not move.
        assert_eq!(
            next_multiplier(0, 1024, 5 * UNIT, 10_000_000, false),
            MULT_MIN
        );
        assert_eq!(
            next_multiplier(u64::MAX, 1024, 5 * UNIT, 10_000_000, false),
            MULT_MAX
        );
    }

    #[test]
    fn a_flow_is_held_by_its_clock_only_two_packets_ahead() {
        assert!(!ack_lead_holds(0, 1_000));
        assert!(!ack_lead_holds(2_000, 1_000));
        assert!(ack_lead_holds(2_001, 1_000));
        assert!(ack_lead_holds(1, 0));
        assert!(!ack_lead_holds(u64::MAX, u64::MAX));
    }

    #[test]
    fn a_clock_is_bound_a_round_trip_after_it_last_fell_behind() {
        let ms = 1_000_000;
        // On time, or behind by less than the packet's time: not behind.
        assert!(!clock_fell_behind(100 * ms, 100 * ms, ms));
        assert!(!clock_fell_behind(100 * ms, 101 * ms, ms));
        assert!(clock_fell_behind(100 * ms, 101 * ms + 1, ms));
        // A flow's first packet (no clock yet).
        assert!(clock_fell_behind(0, 5 * ms, ms));
        assert!(!clock_fell_behind(u64::MAX, 5 * ms, ms));
        // 60 ms round trip: bound from 60 ms after it last fell behind.
        assert!(!clock_bound(100 * ms, 159 * ms, 60_000));
        assert!(clock_bound(100 * ms, 160 * ms, 60_000));
        // Round trip unknown: bound at once.
        assert!(clock_bound(100 * ms, 100 * ms, 0));
        assert!(!clock_bound(u64::MAX, 0, 1));
    }

    #[test]
    fn held_is_recent_or_always_without_ack_pacing() {
        assert!(recently_held(false, 0, u64::MAX));
        assert!(recently_held(true, 100, 100 + HELD_RECENT_NS - 1));
        assert!(!recently_held(true, 100, 100 + HELD_RECENT_NS));
        assert!(!recently_held(true, 0, HELD_RECENT_NS));
        assert!(recently_held(true, u64::MAX - 1, u64::MAX - 1));
    }

    #[test]
    fn ack_clocks_get_the_proportional_gain_in_full_at_any_flow_rate() {
        assert_eq!(kp_full_rate(true), 1);
        assert_eq!(kp_full_rate(false), KP_FULL_RATE);
        // One of 32 flows sharing 10 Mbit/s, its class's fill a whole
        // depth past the target: the whole gain with ACK pacing, a 320th
        // of it with sender pacing.
        let f = 1_250_000 / 32;
        let full = FILL_TARGET + 1024;
        let at_target = pacing_rate(f, UNIT, FILL_TARGET, 1024, 1, 0);
        let ack = pacing_rate(f, UNIT, full, 1024, kp_full_rate(true), 0) - at_target;
        let sender = pacing_rate(f, UNIT, full, 1024, kp_full_rate(false), 0) - at_target;
        assert!(ack.abs_diff(f) <= f / 50, "{ack}");
        assert!(sender <= f / 300, "{sender}");
    }

    #[test]
    fn delay_bounds_the_gains_of_a_slow_loop() {
        // Sixteen flows sharing 10 Mbit/s from 60 ms away: a 64 KB bucket
        // holds 52 ms, the loop's delay is the round trip plus four of
        // their packet times (78 ms): kp 0.19, ki 0.43/s.
        let lead = ack_lead_us(1_250_000 / 16);
        assert_eq!(lead, 77_516);
        let (kp, ki) = delay_bound_gains(65_536, 1_250_000, 60_000 + lead);
        assert_eq!((kp, ki), (195, 436));
        // Twice the delay: half the proportional gain, a quarter of the
        // integral one; twice the bucket: twice both.
        let (kp2, ki2) = delay_bound_gains(65_536, 1_250_000, 2 * (60_000 + lead));
        assert!(
            kp2.abs_diff(kp / 2) <= 1 && ki2.abs_diff(ki / 4) <= 1,
            "{kp2} {ki2}"
        );
        let (kp3, ki3) = delay_bound_gains(2 * 65_536, 1_250_000, 60_000 + lead);
        assert!(
            kp3.abs_diff(2 * kp) <= 1 && ki3.abs_diff(2 * ki) <= 1,
            "{kp3} {ki3}"
        );
        // Delays below 10 ms count as 10 ms.
        assert_eq!(
            delay_bound_gains(65_536, 1_250_000, 0),
            delay_bound_gains(65_536, 1_250_000, LOOP_DELAY_MIN_US)
        );
        // No rate or no bucket: no bound. Extremes stay finite.
        assert_eq!(delay_bound_gains(65_536, 0, 1), (u64::MAX, u64::MAX));
        assert_eq!(
            delay_bound_gains(0, 1_250_000, 60_000),
            (u64::MAX, u64::MAX)
        );
        let (hk, hi) = delay_bound_gains(u64::MAX, 1, 0);
        assert!(hk < u64::MAX && hi < u64::MAX);
        // Delays past what `class_gains` can give count as its longest.
        assert_eq!(
            delay_bound_gains(65_536, 1_250_000, u64::MAX),
            delay_bound_gains(65_536, 1_250_000, 10_000_000 + ACK_LEAD_MAX_US)
        );
    }

    #[test]
    fn young_moving_flows_count_in_full() {
        assert!(young_counts_in_full(0, WOKEN_COUNT_BYTES));
        assert!(young_counts_in_full(YOUNG_COUNT_NS - 1, 1 << 30));
        assert!(!young_counts_in_full(YOUNG_COUNT_NS, 1 << 30));
        assert!(!young_counts_in_full(0, WOKEN_COUNT_BYTES - 1));
    }

    #[test]
    fn pacing_gains_shrink_for_waiting_acks() {
        // 32 flows sharing 10 Mbit/s: four packets of 155 ms; one flow at
        // 10 Mbit/s: 4.8 ms; nearly stopped flows: at most 400 ms.
        assert_eq!(ack_lead_us(1_250_000 / 32), 155_035);
        assert_eq!(ack_lead_us(1_250_000), 4_844);
        assert_eq!(ack_lead_us(0), ACK_LEAD_MAX_US);
        // From 60 ms away: gains sized for 215 ms instead of 60.
        assert_eq!(lead_gain(60_000, 155_035), UNIT * 60_000 / 215_035);
        // Near flows: only the part of the delay past 30 ms counts.
        assert_eq!(lead_gain(1_000, 10_000), UNIT);
        assert_eq!(lead_gain(10_000, 40_000), UNIT * 30_000 / 50_000);
        assert_eq!(lead_gain(60_000, 0), UNIT);
        assert_eq!(lead_gain(u64::MAX, u64::MAX), UNIT * 10_000 / 10_400);
    }

    #[test]
    fn class_gains_follow_round_trip_lead_and_depth() {
        let (kp, ki) = (3 * UNIT / 4, 5 * UNIT);
        // At 10 Mbit/s: 125 ms of bucket is past the full-gain depth.
        let slow = ClassConfig {
            guarantee: 1_250_000,
            alloc: 1_250_000,
            flow_base: 1_250_000 / 32,
            depth: 156_250,
            ..Default::default()
        };
        // No round trip measured, no ACK pacing (egress): as configured.
        assert_eq!(class_gains(kp, ki, 0, &slow, false), (kp, ki));
        // Round trip only without ACK pacing.
        assert_eq!(
            class_gains(kp, ki, 60_000, &slow, false),
            (rtt_gain(kp, 60_000), rtt_gain(ki, 60_000))
        );
        // With ACK pacing: the waiting ACKs, and ki the bucket's depth too;
        // within a unit of the gains of the whole delay.
        let (pkp, pki) = class_gains(kp, ki, 60_000, &slow, true);
        assert!(pkp.abs_diff(rtt_gain(kp, 215_035)) <= 1, "{pkp}");
        let ki_delay = rtt_gain(ki, 60_000) * lead_gain(60_000, 155_035) / UNIT;
        assert!(depth_gain(ki_delay, &slow, true) < ki_delay);
        // ... and both at most what the loop's delay allows: here ki.
        let (kp_max, ki_max) = delay_bound_gains(156_250, 1_250_000, 215_035);
        assert!(pkp < kp_max);
        assert_eq!(pki, ki_max);
        assert!(pki < depth_gain(ki_delay, &slow, true));
        // A borrower's fill comes from the shallower of its buckets, at
        // its allocation: one 20 Mbit/s flow from 60 ms away on a 32 KB
        // borrow bucket (13 ms) gets kp 0.10, not 0.36.
        let borrowing = ClassConfig {
            alloc: 2_500_000,
            borrow_rate: 1_250_000,
            borrow_depth: 32_768,
            flow_base: 2_500_000,
            ..slow
        };
        let bound = delay_bound_gains(32_768, 2_500_000, 60_000 + ack_lead_us(2_500_000));
        let (bkp, bki) = class_gains(kp, ki, 60_000, &borrowing, true);
        assert_eq!(bkp, bound.0);
        assert_eq!(bkp, 107);
        assert!(bki <= bound.1);
        // One fast flow from nearby: in full.
        let fast = ClassConfig {
            flow_base: 125_000_000,
            ..slow
        };
        assert_eq!(class_gains(kp, ki, 1_000, &fast, true).0, kp);
        // Extremes stay finite.
        let (hk, hi) = class_gains(u64::MAX, u64::MAX, u64::MAX, &slow, true);
        assert!(hk <= 1 << 22 && hi <= 1 << 22);
    }

    #[test]
    fn flow_share_cuts_back_only_in_debt() {
        let cfg = ClassConfig {
            guarantee: 100,
            alloc: 400,
            flow_base: 102_400,
            mark_debt: 1000,
            ..Default::default()
        };
        // Not in debt: the allocator's share and the multiplier as they are.
        assert_eq!(
            flow_share(&cfg, 0, 2 * UNIT, 4, true, 0),
            (102_400, 2 * UNIT)
        );
        // Shallow debt, old flow: nothing changes yet.
        assert_eq!(
            flow_share(&cfg, -1000, 2 * UNIT, 4, false, 0),
            (102_400, 2 * UNIT)
        );
        // Deep debt while borrowing: back to the guaranteed quarter.
        assert_eq!(
            flow_share(&cfg, -1001, 2 * UNIT, 4, false, 0),
            (25_600, 2 * UNIT)
        );
        // ... but not from further away than the pacing loop's full gains
        // reach (its own overshoot; see `flow_share`).
        assert_eq!(
            flow_share(&cfg, -1001, 2 * UNIT, 4, false, DEBT_CUT_RTT_MAX_US),
            (25_600, 2 * UNIT)
        );
        assert_eq!(
            flow_share(&cfg, -1001, 2 * UNIT, 4, false, DEBT_CUT_RTT_MAX_US + 1),
            (102_400, 2 * UNIT)
        );
        // Not borrowing: debt alone does not cut the share.
        let owner = ClassConfig { alloc: 100, ..cfg };
        assert_eq!(
            flow_share(&owner, -5000, UNIT, 1, false, 0),
            (102_400, UNIT)
        );
        // Young flow in debt: an even share of the class, multiplier ≤ 1.
        assert_eq!(flow_share(&cfg, -1, 2 * UNIT, 4, true, 0), (100, UNIT));
        assert_eq!(flow_share(&cfg, -1, UNIT / 2, 0, true, 0), (400, UNIT / 2));
        // An empty config divides by nothing.
        assert_eq!(
            flow_share(&ClassConfig::default(), -1, UNIT, 0, true, 0),
            (0, UNIT)
        );
    }

    #[test]
    fn the_integral_gain_shrinks_with_a_deep_bucket_in_time() {
        let class = |guarantee: u64, borrow_rate: u64, depth: u64| ClassConfig {
            guarantee,
            borrow_rate,
            alloc: guarantee + borrow_rate,
            depth,
            ..Default::default()
        };
        // 2 Mbit/s at its 64 KB floor (262 ms): about 0.38 of the gain.
        assert_eq!(depth_gain(2560, &class(250_000, 0, 65_536), true), 976);
        // 100 ms or less of the guarantee: in full.
        assert_eq!(depth_gain(2560, &class(655_360, 0, 65_536), true), 2560);
        assert_eq!(depth_gain(2560, &class(12_500_000, 0, 250_000), true), 2560);
        // Borrowing: its fill comes from the borrow bucket, left alone.
        assert_eq!(
            depth_gain(2560, &class(250_000, 250_000, 65_536), true),
            2560
        );
        // No guarantee (nothing is noise next to it): left alone.
        assert_eq!(depth_gain(2560, &class(0, 0, 65_536), true), 2560);
        // Sender pacing: left alone.
        assert_eq!(depth_gain(2560, &class(250_000, 0, 65_536), false), 2560);
    }

    #[test]
    fn activity_weight_counts_a_flow_by_what_it_uses() {
        let ms = 1_000_000;
        // 1 MB/s paced flow over 100 ms.
        let w = |moved| activity_weight(moved, 100 * ms, 1_000_000);
        // Held at its rate, or over it: counts fully.
        assert_eq!(w(100_000), UNIT);
        assert_eq!(w(500_000), UNIT);
        assert_eq!(w(75_000), UNIT);
        // Between half and three quarters: rising from one half to one.
        assert_eq!(w(50_000), UNIT / 2);
        assert_eq!(w(62_500), 3 * UNIT / 4);
        // Under half: by what it uses.
        assert_eq!(w(25_000), UNIT / 4);
        assert_eq!(w(2_500), 25);
        assert_eq!(w(0), 0);
        // Counted twice within 10 µs, a 64 KB burst at 12.5 MB/s between:
        // as if over 90 ms, not in full.
        assert_eq!(activity_weight(65_536, 10_000, 12_500_000), 59);
        // 90 ms and more are measured as they are.
        assert_eq!(activity_weight(90_000, 90 * ms, 1_000_000), UNIT);
        assert_eq!(activity_weight(45_000, 90 * ms, 1_000_000), UNIT / 2);
        // Degenerate inputs: no time, no rate, huge counters.
        assert_eq!(activity_weight(1, 0, 1_000_000), 0);
        assert_eq!(activity_weight(0, 0, 0), 0);
        assert_eq!(activity_weight(u64::MAX, 1, u64::MAX), UNIT);
        // A request/response flow (25 KB/s) beside a 2 Mbit/s bulk flow of
        // the same class: counts about a tenth.
        assert_eq!(activity_weight(2_500, 100 * ms, 250_000), 102);
    }

    #[test]
    fn a_flow_is_weighed_against_its_class_use_per_flow_at_most() {
        let ms = 1_000_000;
        assert_eq!(weight_reference(1_000_000, 0), 1_000_000);
        assert_eq!(weight_reference(1_000_000, 250_000), 250_000);
        assert_eq!(weight_reference(100_000, 250_000), 100_000);
        // One of 32 window-bound flows of a class moving 1 MB/s (31 KB/s
        // each) whose rate a low count raised eightfold: against its rate
        // it would count an eighth, against their use in full.
        let rate = 8 * 31_250;
        assert_eq!(activity_weight(3_125, 100 * ms, rate), UNIT / 8);
        let average = 1_000_000 / 32;
        assert_eq!(
            activity_weight(3_125, 100 * ms, weight_reference(rate, average)),
            UNIT
        );
        // A flow held at a rate below the others' use still counts in full.
        assert_eq!(
            activity_weight(1_600, 100 * ms, weight_reference(16_000, average)),
            UNIT
        );
        // A light flow (25 KB/s) beside a 225 KB/s bulk flow: the
        // use-weighted use per flow is 205 KB/s; it counts an eighth.
        assert_eq!(
            activity_weight(2_500, 100 * ms, weight_reference(250_000, 205_000)),
            124
        );
    }

    #[test]
    fn a_flows_use_is_counted_in_units_of_128_bytes_per_second() {
        let ms = 1_000_000;
        assert_eq!(flow_use(100_000, 100 * ms), 1_000_000);
        // At least 90 ms.
        assert_eq!(flow_use(90_000, ms), 1_000_000);
        assert_eq!(flow_use(u64::MAX, 0), (1u64 << 40) * 1_000_000 / 90_000);
        assert_eq!(use_units(1_000_000), 7812);
        assert_eq!(use_units(127), 0);
        // One of 32 flows of a 256 kbit/s class.
        assert_eq!(use_units(1_000), 7);
        assert_eq!(use_units(u64::MAX), USE_UNITS_MAX);
        // Its square summed over 2^21 flow counts fits.
        assert!(
            USE_UNITS_MAX
                .checked_mul(USE_UNITS_MAX)
                .and_then(|sq| sq.checked_mul(1 << 21))
                .is_some()
        );
    }

    #[test]
    fn pacing_rate_follows_base_multiplier_and_fill() {
        let base = 1024 * 25_000; // above KP_FULL_RATE: full gain
        let t = FILL_TARGET;
        let full = KP_FULL_RATE;
        assert_eq!(pacing_rate(base, UNIT, t, 128, full, 0), base);
        assert_eq!(pacing_rate(base, 2 * UNIT, t, 128, full, 0), 2 * base);
        // A full depth of error with kp = 1/8: ±12.5 %.
        assert_eq!(
            pacing_rate(base, UNIT, 1024 + t, 128, full, 0),
            base + base / 8
        );
        assert_eq!(
            pacing_rate(base, UNIT, -1024 + t, 128, full, 0),
            base - base / 8
        );
        // Never below a quarter of the base, never above max.
        assert_eq!(
            pacing_rate(base, UNIT / 2, -1024, 4 * UNIT, full, 0),
            base / 4
        );
        assert_eq!(pacing_rate(base, UNIT / 2, 0, 0, full, 0), base / 2);
        // A slow flow gets a proportionally smaller correction.
        let slow = KP_FULL_RATE / 8;
        let up = pacing_rate(slow, UNIT, 1024 + t, 1024, full, 0) - slow;
        assert!(up.abs_diff(slow / 8) < slow / 50, "{up}");
        assert_eq!(
            pacing_rate(base, MULT_MAX, 1024, 4 * UNIT, full, 3 * base),
            3 * base
        );
        // A full rate of 0 is read as 1 (no division by zero).
        assert!(pacing_rate(base, UNIT, t, 128, 0, 0) >= base / 4);
    }

    #[test]
    fn pacing_changes_only_past_one_thirty_second() {
        assert!(pacing_changed(0, 100));
        assert!(!pacing_changed(1000, 1010));
        assert!(pacing_changed(1000, 1040));
        assert!(pacing_changed(1100, 1000));
    }

    #[test]
    fn tcp_rate_is_below_wire_rate() {
        assert_eq!(wire_to_tcp_rate(1514 * 1000), 1480 * 1000);
        assert!(wire_to_tcp_rate(u64::MAX) <= MAX_RATE);
    }

    #[test]
    fn ack_clock_holds_a_flow_at_its_rate() {
        // 100 Mbit/s on the wire = 12.5 MB/s: a 64 KB packet takes 5.24 ms.
        let rate = 12_500_000;
        // Under its rate: acknowledged at once, the clock one packet ahead.
        let (at, next) = ack_release(0, 1_000_000, 65_536, rate, 0);
        assert_eq!(at, 1_000_000);
        assert_eq!(next, 1_000_000 + 5_242_880);
        // A second packet right behind it waits for the first one's time.
        let (at2, next2) = ack_release(next, 1_000_100, 65_536, rate, 0);
        assert_eq!(at2, next);
        assert_eq!(next2, next + 5_242_880);
        // A burst of 100 such packets at one instant: acknowledged at the
        // rate until the ACKs would wait more than six packet times (more
        // than 20 ms here); from then on each leaves that long after it
        // arrived, and the clock goes on from there.
        let cap = ack_lead_cap(0, 5_242_880);
        assert_eq!(cap, 6 * 5_242_880);
        let mut clock = 0;
        let mut last = 0;
        for k in 0..100u64 {
            let (at, next) = ack_release(clock, 10, 65_536, rate, 0);
            assert_eq!(at, (10 + k * 5_242_880).min(10 + cap));
            assert_eq!(next, at + 5_242_880);
            (last, clock) = (at, next);
        }
        assert_eq!(last, 10 + cap);
        // From 60 ms away the same burst waits up to twice the round trip.
        let mut clock = 0;
        for _ in 0..100 {
            (last, clock) = ack_release(clock, 10, 65_536, rate, 60_000);
        }
        assert_eq!(last, 10 + 120_000_000);
        // Idle time is not banked: after a pause the clock restarts at now.
        let (at, _) = ack_release(clock, clock + 1_000_000_000, 1500, rate, 0);
        assert_eq!(at, clock + 1_000_000_000);
        // A zero rate does not divide by zero; one packet never holds the
        // clock more than a second.
        let (at, next) = ack_release(0, 5, 65_536, 0, 0);
        assert_eq!((at, next), (5, 5 + NS_PER_SEC));
        // The cap: 20 ms, twice a longer round trip (at most 400 ms), or
        // six packet times of a slow flow.
        assert_eq!(ack_lead_cap(0, 0), 20_000_000);
        assert_eq!(ack_lead_cap(10_000, 1_000_000), 20_000_000);
        assert_eq!(ack_lead_cap(60_000, 1_000_000), 120_000_000);
        assert_eq!(ack_lead_cap(u64::MAX, 0), 400_000_000);
        assert_eq!(ack_lead_cap(100, 15_000_000), 90_000_000);
        assert_eq!(ack_lead_cap(0, u64::MAX), 6 * NS_PER_SEC);
    }

    proptest! {
        #[test]
        fn activity_weight_is_bounded_and_monotonic(moved in any::<u64>(), more in 0u64..1 << 30,
                                                    elapsed in any::<u64>(), rate in any::<u64>()) {
            let w = activity_weight(moved, elapsed, rate);
            prop_assert!(w <= UNIT);
            prop_assert!(activity_weight(moved.saturating_add(more), elapsed, rate) >= w);
            prop_assert!(activity_weight(moved, elapsed, rate.saturating_add(more)) <= w);
        }

        #[test]
        fn ack_clock_is_monotonic_capped_and_bounded(next in any::<u64>(), now in any::<u64>(),
                                                     wire in any::<u64>(), rate in any::<u64>(),
                                                     rtt in any::<u64>()) {
            let dur = (wire.min(1 << 32) * NS_PER_SEC / rate.max(1)).min(NS_PER_SEC);
            let cap = ack_lead_cap(rtt, dur);
            let (at, n) = ack_release(next, now, wire, rate, rtt);
            // Never before now or the clock, unless the clock is past the cap.
            prop_assert!(at >= now && at <= now.saturating_add(cap));
            prop_assert!(at >= next.min(now.saturating_add(cap)));
            prop_assert!(n >= at);
            prop_assert!(n - at <= NS_PER_SEC || n == u64::MAX);
        }

        #[test]
        fn a_burst_of_first_flights_stays_within_the_room(rate in 1u64..MAX_RATE,
                                                          rtt in 0u64..2_000_000,
                                                          flows in 1usize..200, open in 0u64..64) {
            let now = 10 * NS_PER_SEC;
            let rtt_ns = if rtt == 0 { FIRST_FLIGHT_RTT_US } else { rtt.min(1_000_000) } * 1_000;
            let room = rate * (rtt_ns / 1_000) / 1_000_000 / SEGMENT_WIRE_BYTES;
            let (mut clock, mut granted) = (0, 0);
            for _ in 0..flows {
                let (reply, next) = first_flight(clock, now, rate, rtt, open);
                prop_assert!(next >= clock.min(now + 2 * rtt_ns) && next <= now + 2 * rtt_ns);
                // Bounded flows get at least two segments, less than the
                // kernel's window.
                prop_assert!(reply == 0 || (2..KERNEL_INITIAL_SEGMENTS as u32).contains(&reply));
                let segs = if reply == 0 { SENDER_INITIAL_SEGMENTS } else { u64::from(reply) };
                let segs = segs.min(SENDER_INITIAL_SEGMENTS);
                if segs > FIRST_FLIGHT_MIN_SEGMENTS {
                    granted += segs;
                }
                clock = next;
            }
            // Past the two-segment floor, a burst is charged no more than
            // the room.
            prop_assert!(granted <= room, "{granted} > {room}");
        }

        #[test]
        fn earned_never_overflows(el in any::<u64>(), rate in any::<u64>()) {
            let e = earned(el, rate);
            prop_assert!(e <= MAX_RATE);
        }

        #[test]
        fn decide_is_total_and_consistent(own in any::<i64>(), borrow in any::<i64>(), ceil in any::<i64>(),
                                          pool in any::<i64>(), prio in 0u32..8, has_ceil in any::<bool>(),
                                          len in 0u64..200_000, paced in any::<bool>(),
                                          answers_marks in any::<bool>(), window_bound in any::<bool>(),
                                          no_payload in any::<bool>()) {
            let flow = FlowKind { paced, answers_marks, window_bound, no_payload };
            let lim = Limits { priority: prio, has_ceil, flow, ..limits() };
            let l = Levels { own, borrow, ceil, pool };
            let v = decide(&l, &lim, len);
            if own > 0 { prop_assert_eq!(v, Verdict::Own); }
            if matches!(v, Verdict::Borrow | Verdict::BorrowExtra) {
                prop_assert!(!has_ceil || ceil > 0);
                prop_assert!(pool > borrow_threshold(prio, lim.prio_step));
            }
            let past_ceiling = window_bound && !no_payload && has_ceil && ceil <= 0;
            prop_assert!(!((no_payload || window_bound) && v == Verdict::OverMark));
            if matches!(v, Verdict::PastCeiling { .. } | Verdict::DropCharged) || (window_bound && v == Verdict::Drop) {
                prop_assert!(past_ceiling && own <= 0);
                let debt = len.saturating_add(ceil.unsigned_abs());
                prop_assert_eq!(v == Verdict::Drop, debt > lim.drop_debt * PACED_DROP_FACTOR);
                prop_assert_eq!(v == Verdict::PastCeiling { mark: false }, debt <= lim.mark_debt);
                if v == Verdict::DropCharged {
                    prop_assert!(!answers_marks);
                    let step = spaced_drop_step(lim.mark_debt);
                    prop_assert!(ceil.unsigned_abs() / step < debt / step);
                }
            }
            if no_payload {
                let dropped_or_policed = matches!(v, Verdict::Drop | Verdict::DropCharged | Verdict::PastCeiling { .. });
                prop_assert!(!dropped_or_policed);
            }
            if v == Verdict::OverUncharged {
                prop_assert!(no_payload || window_bound);
                prop_assert!(len.saturating_add(own.unsigned_abs()) > lim.mark_debt);
            }
            if v == Verdict::Drop {
                prop_assert!(len.saturating_add(own.unsigned_abs()) > lim.drop_debt);
                if paced || answers_marks {
                    prop_assert!(len.saturating_add(own.unsigned_abs()) > lim.drop_debt * PACED_DROP_FACTOR);
                }
            }
            if v == Verdict::OverMark && !paced {
                prop_assert!(len.saturating_add(own.unsigned_abs()) > lim.mark_debt);
            }
        }

        #[test]
        fn debt_repayment_moves_no_more_than_owed_or_held(own in any::<i64>(), borrow in any::<i64>()) {
            let r = debt_repayment(own, borrow);
            prop_assert!(r >= 0);
            prop_assert!(r as u64 <= own.min(0).unsigned_abs());
            prop_assert!(r as u64 <= borrow.max(0).unsigned_abs());
            // After the move neither bucket changes sign the wrong way.
            prop_assert!(own.saturating_add(r) <= 0 || own > 0);
            prop_assert!(borrow - r >= 0 || borrow < 0);
        }

        #[test]
        fn pacing_rate_is_bounded(base in 0u64..MAX_RATE, mult in any::<u64>(), fill in -1024i64..=1024,
                                  kp in any::<u64>(), full in any::<u64>(), max in any::<u64>()) {
            let r = pacing_rate(base, mult, fill, kp, full, max);
            if max != 0 { prop_assert!(r <= max); }
            if max == 0 || max >= base / 4 { prop_assert!(r >= base / 4); }
        }

        #[test]
        fn multiplier_is_bounded(m in any::<u64>(), fill in -1024i64..=1024, ki in any::<u64>(), dt in any::<u64>(),
                                 held in any::<bool>()) {
            let n = next_multiplier(m, fill, ki, dt, held);
            prop_assert!((MULT_MIN..=MULT_MAX).contains(&n));
            if !held && fill > FILL_TARGET {
                prop_assert_eq!(n, m.clamp(MULT_MIN, MULT_MAX));
            }
        }
    }
}
