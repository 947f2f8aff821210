//! The shaper: class bookkeeping around the datapath and the control loop
//! that shares the spare capacity, for each direction (egress, and ingress
//! when configured) of the shaped interface.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use qos_common::{
    net::{
        ClassConfig, ClassCounters, ClassState, DEFAULT_SLOT, GLOBAL_ACK_PACING, GLOBAL_CLAMP_ECN,
        GLOBAL_ENABLED, GLOBAL_RECEIVED, GLOBAL_RELEASE, GLOBAL_REPLACE_BBR, LOWEST_PRIORITY,
        MAX_CLASSES, NetGlobal,
    },
    policy::{UNIT, class_fill_at},
};
use qos_core::{CgroupRef, Rate};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, trace, warn};

use crate::{
    NetError,
    datapath::{ClassMaps, Datapath, Direction, ProgramStats},
    ifaces::{self, ContainerInterfaces},
    policy::{self, ClassDemand, Observation, Tuning},
    qdisc::{self, AckQdisc},
};

/// How often the allocator runs.
pub const TICK: Duration = Duration::from_millis(10);
const TICK_NS: u64 = TICK.as_nanos() as u64;
/// Activity epoch over which flows are counted.
const EPOCH: Duration = Duration::from_nanos(qos_common::policy::ACTIVITY_EPOCH_NS);
/// How often new container interfaces are looked for.
const SCAN: Duration = Duration::from_secs(1);
/// Time constant of the measured rates.
const RATE_TAU_NS: u64 = 50_000_000;
/// A class must look like it wants less for this long before the allocator
/// lends its share out (prevents allocation flapping on noisy samples).
const DEMAND_HOLD_NS: u64 = 100_000_000;
/// How long an adopted class keeps the parameters the earlier daemon gave
/// it while the new one measures it (several rate time constants and
/// activity epochs): a controller that has not measured yet would move
/// them on guesses.
const ADOPT_SETTLE: Duration = Duration::from_millis(1000);
/// How long the pacer gets to lift pacing from active flows at shutdown.
const RELEASE_GRACE: Duration = Duration::from_millis(200);
/// A freed slot is not reused before sockets cached on it were reclassified.
const SLOT_QUARANTINE: Duration = Duration::from_secs(2);

/// Host configuration of the shaper.
#[derive(Clone, Debug)]
pub struct ShaperSettings {
    pub interface: String,
    /// Egress capacity.
    pub capacity: Rate,
    /// Guarantee of the default class (traffic of cgroups without a quota);
    /// None: best effort, it only gets capacity the others leave.
    pub default_rate: Option<Rate>,
    /// Ingress capacity; None: received traffic is not shaped.
    pub ingress_capacity: Option<Rate>,
    /// Ingress guarantee of the default class.
    pub ingress_default_rate: Option<Rate>,
    /// Clamp the receive window of ECN flows too (see `GLOBAL_CLAMP_ECN`).
    pub ingress_clamp_ecn: bool,
    /// Pace received TCP flows by their ACKs (fq at the interface's root;
    /// see [`crate::qdisc`]).
    pub ingress_ack_pacing: bool,
    /// Bytes of the buffer received traffic queues in upstream (the switch
    /// port): without ACK pacing, received flows' windows add up to half of
    /// it beyond their round trips. [`UPSTREAM_BUFFER_RANGE`].
    pub ingress_upstream_buffer: u64,
    pub default_priority: u32,
    pub container_interfaces: ContainerInterfaces,
    /// Switch shaped BBR flows to CUBIC (see `GLOBAL_REPLACE_BBR`).
    pub replace_bbr: bool,
    pub tuning: Tuning,
    /// bpffs directory where the datapath is pinned so that it outlives
    /// the process (a daemon restart); `None`: it goes with the shaper.
    pub pin_root: Option<PathBuf>,
    /// Most quotas per direction, 1 ..= `MAX_CLASSES - 1` (slot 0 is the
    /// default class); each costs map reads every control step.
    pub max_quotas: u32,
}

/// Upstream buffers a shaper accepts (`ShaperSettings::ingress_upstream_buffer`):
/// half must hold a few full-size segments; past 256 MB it is not a
/// switch port's.
pub const UPSTREAM_BUFFER_RANGE: std::ops::RangeInclusive<u64> = 16 * 1024..=256 << 20;

/// The most quotas one direction can hold.
pub const MAX_QUOTAS: u32 = MAX_CLASSES - 1;

/// A cgroup's network quota, per direction. A direction without a rate is
/// not shaped for this cgroup (its traffic counts as the default class).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetQuota {
    /// Guaranteed egress rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Most it may send when others leave capacity idle; the capacity when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceil: Option<Rate>,
    /// 0 (highest) ..= 7, both directions.
    #[serde(default)]
    pub priority: u32,
    /// Guaranteed ingress rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_rate: Option<Rate>,
    /// Most it may receive when others leave capacity idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_ceil: Option<Rate>,
}

/// One direction of a quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirQuota {
    pub rate: Rate,
    pub ceil: Option<Rate>,
    pub priority: u32,
}

impl NetQuota {
    /// An egress-only quota.
    pub fn egress(rate: Rate, ceil: Option<Rate>, priority: u32) -> Self {
        Self {
            rate: Some(rate),
            ceil,
            priority,
            ..Default::default()
        }
    }

    /// An ingress-only quota.
    pub fn ingress(rate: Rate, ceil: Option<Rate>, priority: u32) -> Self {
        Self {
            ingress_rate: Some(rate),
            ingress_ceil: ceil,
            priority,
            ..Default::default()
        }
    }

    /// The quota of one direction, if it has one.
    pub fn dir(&self, dir: Direction) -> Option<DirQuota> {
        let (rate, ceil) = match dir {
            Direction::Egress => (self.rate, self.ceil),
            Direction::Ingress => (self.ingress_rate, self.ingress_ceil),
        };
        rate.map(|rate| DirQuota {
            rate,
            ceil,
            priority: self.priority,
        })
    }

    /// Checks the quota's form (capacity checks are per direction, in
    /// [`DirQuota::validate`]).
    pub fn validate_form(&self) -> Result<(), NetError> {
        if self.rate.is_none() && self.ingress_rate.is_none() {
            return Err(NetError::InvalidQuota(
                "give an egress rate, an ingress rate, or both".into(),
            ));
        }
        if self.ceil.is_some() && self.rate.is_none() {
            return Err(NetError::InvalidQuota(
                "an egress ceil needs an egress rate".into(),
            ));
        }
        if self.ingress_ceil.is_some() && self.ingress_rate.is_none() {
            return Err(NetError::InvalidQuota(
                "an ingress ceil needs an ingress rate".into(),
            ));
        }
        if self.priority > LOWEST_PRIORITY {
            return Err(NetError::InvalidQuota(format!(
                "priority {} is out of range; use 0 (highest) to {LOWEST_PRIORITY}",
                self.priority
            )));
        }
        Ok(())
    }
}

impl DirQuota {
    /// Checks the quota against the direction's capacity.
    pub fn validate(&self, dir: Direction, capacity: Rate) -> Result<(), NetError> {
        if self.rate > capacity {
            return Err(NetError::InvalidQuota(format!(
                "{dir} rate {} exceeds the {dir} capacity {capacity}",
                self.rate
            )));
        }
        if let Some(ceil) = self.ceil {
            if ceil < self.rate {
                return Err(NetError::InvalidQuota(format!(
                    "{dir} ceil {ceil} is below the guaranteed {dir} rate {}",
                    self.rate
                )));
            }
            if ceil > capacity {
                return Err(NetError::InvalidQuota(format!(
                    "{dir} ceil {ceil} exceeds the {dir} capacity {capacity}"
                )));
            }
        }
        Ok(())
    }
}

/// What `net show` reports for one class.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NetClassStatus {
    /// cgroup name relative to the cgroup2 root; "(default)" for the class of
    /// unconfigured traffic.
    pub cgroup: String,
    pub cgroup_id: u64,
    pub slot: u32,
    pub rate: String,
    pub ceil: String,
    pub priority: u32,
    /// Guarantee + share of the spare the allocator currently gives it.
    pub alloc_bps: u64,
    /// Measured send rate (wire bits per second, smoothed over ~50 ms).
    pub rate_bps: u64,
    pub bytes: u64,
    pub packets: u64,
    pub borrowed_bytes: u64,
    pub over_bytes: u64,
    pub ce_marks: u64,
    pub drops: u64,
    pub drop_bytes: u64,
    /// Bucket levels (bytes; negative = debt) and the pacing multiplier
    /// (1.0 = neutral), for diagnosis.
    pub own_tokens: i64,
    pub borrow_tokens: i64,
    /// Ceiling bucket (full while no ceiling applies).
    #[serde(default)]
    pub ceil_tokens: i64,
    pub pacing_multiplier: f64,
    /// Open TCP flows that are paced.
    pub flows: u64,
    /// Flows the allocation is split over (app-limited flows count partly).
    pub active_flows: f64,
    pub pacing_updates: u64,
    /// Receive-window clamps written (ingress flows without ECN).
    #[serde(default)]
    pub window_clamps: u64,
    /// Ingress: flows accepted with an initial receive window below the
    /// kernel's (their class's first flights filled a round trip).
    #[serde(default)]
    pub initial_windows: u64,
    /// Ingress without ACK pacing: received bytes that neither a window nor
    /// CE marks hold (UDP, a TCP flow without ECN before its first window
    /// step).
    #[serde(default)]
    pub unheld_bytes: u64,
    /// Ingress without ACK pacing: the class is held at its allocation
    /// (its windows steered to it, its ceiling in the datapath a quarter
    /// above it) while another class receives traffic no window holds
    /// (`policy::datapath_ceil`).
    #[serde(default)]
    pub held_at_alloc: bool,
    /// Ingress: the longest round trip of the class's flows (µs, decaying),
    /// which scales its pacing loop's gains down past 30 ms.
    #[serde(default)]
    pub rtt_us: u64,
    /// Ingress: the longest round trip its flows' receive windows covered
    /// (µs, decaying): `rtt_us`, or the path round trip measured from the
    /// flows' ACKs to the data answering them where a queue upstream
    /// lengthened it (ACK pacing only).
    #[serde(default)]
    pub window_rtt_us: u64,
}

/// What `net show` reports for the ingress direction.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct IngressStatus {
    pub capacity: String,
    pub capacity_bps: u64,
    pub classes: Vec<NetClassStatus>,
    pub pool_tokens: i64,
    /// "on", or "off: <why>".
    #[serde(default)]
    pub ack_pacing: String,
    /// The upstream buffer the windows are sized for where ACK pacing is
    /// off (`ShaperSettings::ingress_upstream_buffer`), bytes.
    #[serde(default)]
    pub upstream_buffer_bytes: u64,
    /// The queue time (µs) the windows add up to beyond their round trips
    /// there (`NetGlobal::shared_queue_us`): half that buffer's at the
    /// capacity, within 100 µs .. 10 ms.
    #[serde(default)]
    pub shared_queue_us: u64,
}

/// What `net show` reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NetStatus {
    pub interface: String,
    pub capacity: String,
    pub capacity_bps: u64,
    pub classes: Vec<NetClassStatus>,
    pub tagged_interfaces: Vec<String>,
    /// Shared pool level, bytes.
    pub pool_tokens: i64,
    /// Received traffic, when ingress shaping is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressStatus>,
    #[serde(default)]
    pub programs: Vec<ProgramStatsOut>,
}

/// Per-program run-time figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ProgramStatsOut {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
    pub ns_per_run: f64,
}

impl From<ProgramStats> for ProgramStatsOut {
    fn from(p: ProgramStats) -> Self {
        let ns = if p.run_count > 0 {
            p.run_time_ns as f64 / p.run_count as f64
        } else {
            0.0
        };
        Self {
            name: p.name,
            run_count: p.run_count,
            run_time_ns: p.run_time_ns,
            ns_per_run: ns,
        }
    }
}

#[derive(Debug)]
struct Class {
    /// None for the default class.
    cgroup: Option<CgroupRef>,
    quota: DirQuota,
    /// Guaranteed bytes/s (0 for a best-effort default class).
    guarantee: u64,
    slot: u32,
    cfg: ClassConfig,
    prev: ClassState,
    counters: ClassCounters,
    rate: f64,
    fill: f64,
    /// Flows the allocation is split over, 1/1024.
    flows: u64,
    activations_mark: u64,
    /// Since when (ns) the class has looked like it wants less.
    wants_less_since: Option<u64>,
    /// Consecutive control steps in which it sent nothing.
    silent_ticks: u32,
    /// When (ns) the datapath last dropped one of its packets.
    last_drop_ns: Option<u64>,
    /// Flows acknowledged in the last three activity epochs (a flow stalled
    /// for an epoch still counts).
    recent_flows: [u64; 3],
    /// The class's use per flow weighted by use (`policy::flow_even`) over
    /// the last three activity epochs, and the counters' use sums at the
    /// last epoch.
    flow_even: u64,
    use_mark: (u64, u64),
    recent_use: [(u64, u64); 3],
    /// Adopted: its datapath parameters are left alone until then.
    settle_until: Option<Instant>,
    /// Smoothed rate of its received bytes no window held, bytes/s.
    unheld_rate: f64,
    /// Since when (ns) that has been a part of its traffic
    /// (`policy::receives_unheld`).
    unheld_since: Option<u64>,
    /// Multiplier its windows are sized at where windows hold received
    /// flows: the integral of `policy::window_mults` (what is applied is
    /// in `cfg.window_mult`).
    window_integral: f64,
    /// Since when (ns) it has received without falling silent.
    busy_since: Option<u64>,
    /// When (ns) it woke (`policy::wakes_with`) since its last silence.
    woke_ns: Option<u64>,
    /// When (ns) `policy::held_window_mult` last steered its windows.
    held_steered_ns: Option<u64>,
    /// Held at its allocation beside traffic no window holds
    /// (`policy::datapath_ceil`), as of the last step.
    held: bool,
    /// Marked or dropped in the last interval.
    policed: bool,
}

impl Class {
    fn new(
        cgroup: Option<CgroupRef>,
        quota: DirQuota,
        guarantee: u64,
        slot: u32,
        cfg: ClassConfig,
        dp: &ClassMaps,
    ) -> Result<Self, NetError> {
        let counters = dp.read_counters(slot)?;
        Ok(Self {
            cgroup,
            quota,
            guarantee,
            slot,
            cfg,
            prev: dp.read_state(slot)?,
            counters,
            rate: 0.0,
            fill: 1.0,
            flows: UNIT,
            activations_mark: counters.flow_activations,
            wants_less_since: None,
            silent_ticks: 0,
            last_drop_ns: None,
            recent_flows: [0; 3],
            flow_even: 0,
            use_mark: (counters.use_sum, counters.use_squares),
            recent_use: [(0, 0); 3],
            settle_until: None,
            unheld_rate: 0.0,
            unheld_since: None,
            window_integral: 1.0,
            busy_since: None,
            woke_ns: None,
            held_steered_ns: None,
            held: false,
            policed: false,
        })
    }

    /// Starts the measurements where the datapath's parameters say the
    /// class was (an adopted class): sending at its allocation, over as
    /// many flows as its per-flow share implies.
    fn resume_from(&mut self, cfg: &ClassConfig) {
        self.settle_until = Some(Instant::now() + ADOPT_SETTLE);
        self.rate = cfg.alloc as f64;
        if cfg.flow_base > 0 {
            self.flows =
                ((cfg.alloc as u128 * UNIT as u128 / cfg.flow_base as u128) as u64).max(UNIT);
        }
    }

    /// Whether it has received traffic no window holds for
    /// [`policy::UNHELD_HOLD_NS`].
    fn receives_unheld(&self, now_ns: u64) -> bool {
        self.unheld_since
            .is_some_and(|t| now_ns.saturating_sub(t) >= policy::UNHELD_HOLD_NS)
    }

    /// Whether it has received for [`policy::WINDOW_STEER_AFTER_NS`]
    /// without falling silent: long enough for its smoothed rate to say
    /// what its windows give it.
    fn busy_long_enough(&self, now_ns: u64) -> bool {
        self.silent_ticks == 0
            && self
                .busy_since
                .is_some_and(|t| now_ns.saturating_sub(t) >= policy::WINDOW_STEER_AFTER_NS)
    }

    fn name(&self) -> &str {
        self.cgroup
            .as_ref()
            .map_or("(default)", |c| c.name.as_str())
    }

    fn ceil(&self, capacity: u64) -> u64 {
        self.quota.ceil.map(bytes).unwrap_or(capacity)
    }

    /// Takes in one control interval's state and counters and says what the
    /// class wants next, and while it wakes from afar what its rate says it
    /// wants (`policy::share_spare_waking`).
    fn observe(
        &mut self,
        st: ClassState,
        ct: ClassCounters,
        dt_ns: u64,
        now_ns: u64,
        epoch_due: bool,
        capacity: u64,
    ) -> (ClassDemand, Option<Option<u64>>) {
        // A counter's smoothed rate over the interval, bytes/s.
        let smoothed = |prev: f64, delta: u64| {
            policy::ewma(prev, delta as f64 * 1e9 / dt_ns as f64, dt_ns, RATE_TAU_NS)
        };
        let d_bytes = ct.bytes.wrapping_sub(self.counters.bytes);
        self.rate = smoothed(self.rate, d_bytes);
        let d_unheld = ct.unheld_bytes.wrapping_sub(self.counters.unheld_bytes);
        self.unheld_rate = smoothed(self.unheld_rate, d_unheld);
        if policy::receives_unheld(self.unheld_rate, self.rate, capacity) {
            self.unheld_since.get_or_insert(now_ns);
        } else {
            self.unheld_since = None;
        }
        // The datapath refills lazily, on packets: add what an idle class
        // earned since its last packet.
        let since = now_ns.saturating_sub(st.last_ns);
        let fill = class_fill_at(st.own, st.borrow, since, &self.cfg);
        self.fill = policy::ewma(self.fill, fill as f64 / UNIT as f64, dt_ns, RATE_TAU_NS);
        if epoch_due {
            let act = ct.flow_activations.wrapping_sub(self.activations_mark);
            self.activations_mark = ct.flow_activations;
            self.recent_flows.rotate_right(1);
            self.recent_flows[0] = act;
            let act = self.recent_flows.iter().copied().max().unwrap_or(act);
            self.flows = policy::active_flows(act, st.flows_open);
            let used = (
                ct.use_sum.wrapping_sub(self.use_mark.0),
                ct.use_squares.wrapping_sub(self.use_mark.1),
            );
            self.use_mark = (ct.use_sum, ct.use_squares);
            self.recent_use.rotate_right(1);
            self.recent_use[0] = used;
            let (sum, squares) = self.recent_use.iter().fold((0u64, 0u64), |(a, b), (s, q)| {
                (a.saturating_add(*s), b.saturating_add(*q))
            });
            self.flow_even = policy::flow_even(sum, squares);
        }
        self.silent_ticks = if d_bytes == 0 {
            self.silent_ticks.saturating_add(1)
        } else {
            0
        };
        let silent = self.silent_ticks >= policy::silent_steps(st.rtt_us, TICK_NS);
        if silent {
            self.busy_since = None;
            self.woke_ns = None;
        } else if d_bytes > 0 {
            self.busy_since.get_or_insert(now_ns);
            if policy::wakes_with(d_bytes as f64 * 1e9 / dt_ns.max(1) as f64, self.guarantee) {
                self.woke_ns.get_or_insert(now_ns);
            }
        }
        let dropped_bytes = ct.drop_bytes.wrapping_sub(self.counters.drop_bytes);
        self.policed = dropped_bytes > 0 || ct.ce_marks != self.counters.ce_marks;
        if dropped_bytes > 0 {
            self.last_drop_ns = Some(now_ns);
        }
        let obs = Observation {
            fill: self.fill,
            rate: self.rate,
            alloc: self.cfg.alloc,
            over_bytes: ct.over_bytes.wrapping_sub(self.counters.over_bytes),
            dropped_bytes,
            bytes: d_bytes,
        };
        // While it wakes from afar: what its rate says it wants, the demand
        // the other classes' shares are computed with
        // (`policy::share_spare_waking`).
        let mut waking_estimate = None;
        let demand = if policy::stalled_by_drops(self.last_drop_ns, now_ns) {
            // Its flows may be waiting out a retransmission timeout: neither
            // silence nor a low rate says it wants less (lent out, its share
            // let the others fill the link while it stalled).
            self.wants_less_since = None;
            None
        } else if silent {
            // Gone quiet: lend its share out now. The run of wanting less
            // goes on through the silence: a trickle after it (a handshake,
            // a keepalive) does not take the share back.
            self.wants_less_since.get_or_insert(now_ns);
            Some(0)
        } else if policy::unheld_traffic_starting(self.unheld_since, now_ns) {
            // Starting UDP: greedy whatever it gets so far.
            self.wants_less_since = None;
            None
        } else if policy::waking(self.woke_ns, now_ns, st.rtt_us, DEMAND_HOLD_NS) {
            // Its flows' windows are still ramping: it keeps its share;
            // from afar the others hand it back as its rate grows. The hold
            // starts again once it has woken.
            self.wants_less_since = None;
            waking_estimate = policy::wakes_from_afar(st.rtt_us, DEMAND_HOLD_NS)
                .then(|| policy::estimate_demand(&obs));
            None
        } else {
            policy::held_demand(
                policy::estimate_demand(&obs),
                &mut self.wants_less_since,
                now_ns,
                DEMAND_HOLD_NS,
            )
        };
        self.prev = st;
        self.counters = ct;
        let wanted = ClassDemand {
            guarantee: self.guarantee,
            ceil: self.ceil(capacity),
            priority: self.quota.priority,
            demand,
        };
        (wanted, waking_estimate)
    }
}

/// The classes of one direction: slots, the default class, the allocator.
#[derive(Debug)]
struct ClassTable {
    dir: Direction,
    /// "eth0 egress": what admission errors name.
    label: String,
    capacity: Rate,
    default_rate: Option<Rate>,
    global: NetGlobal,
    default: Class,
    classes: BTreeMap<String, Class>,
    free: Vec<u32>,
    quarantine: Vec<(Instant, u32)>,
    next_slot: u32,
    /// One past the highest slot this table may use.
    slot_limit: u32,
    /// cgroup id → slot that an earlier daemon left in the adopted maps,
    /// not yet claimed by a quota of ours.
    adopted: BTreeMap<u64, u32>,
    /// Until when (ns) the classes that receive no traffic unheld by
    /// windows are held at their allocations (`policy::datapath_ceil`).
    hold_at_alloc_until: Option<u64>,
}

/// `cfg` with its pacing gains sized for the class's round trip `rtt_us`
/// (0: none measured yet) and, with ACK pacing (in `flags`), for the ACKs
/// its flows keep waiting (`qos_common::policy::class_gains`).
fn sized_gains(mut cfg: ClassConfig, tuning: &Tuning, rtt_us: u64, flags: u32) -> ClassConfig {
    (cfg.pacing_kp, cfg.pacing_ki) = qos_common::policy::class_gains(
        tuning.pacing_kp,
        tuning.pacing_ki,
        rtt_us,
        &cfg,
        flags & GLOBAL_ACK_PACING != 0,
    );
    cfg
}

fn bytes(rate: Rate) -> u64 {
    rate.bytes_per_sec()
}

impl ClassTable {
    fn start(
        dir: Direction,
        capacity: Rate,
        default_rate: Option<Rate>,
        flags: u32,
        settings: &ShaperSettings,
        dp: &mut Datapath,
    ) -> Result<Self, NetError> {
        if let Some(r) = default_rate.filter(|r| *r > capacity) {
            return Err(NetError::InvalidQuota(format!(
                "{dir} default rate {r} exceeds the {dir} capacity {capacity}"
            )));
        }
        let cap = bytes(capacity);
        let mut global = policy::global_params(
            cap,
            dp.ifindex(),
            settings.ingress_upstream_buffer,
            &settings.tuning,
        );
        global.flags = flags;
        let default_guarantee = default_rate.map(bytes).unwrap_or(0);
        let default_quota = DirQuota {
            // Only shown; the guarantee below is what counts.
            rate: default_rate.unwrap_or(capacity),
            ceil: None,
            priority: settings.default_priority,
        };
        let cfg = sized_gains(
            policy::class_params(
                default_guarantee,
                cap,
                settings.default_priority,
                0,
                UNIT,
                0,
                &settings.tuning,
            ),
            &settings.tuning,
            0,
            flags,
        );
        let adopting = dp.adopted();
        let maps = dp.maps(dir);
        let adopted: BTreeMap<u64, u32> = if adopting {
            // Same classification and activity epochs as the earlier
            // daemon: sockets keep their cached class (the mapping does not
            // change for adopted cgroups; `finish_adoption` moves the
            // generation on if it drops any).
            let old = maps.read_global()?;
            global.generation = old.generation;
            global.epoch = old.epoch;
            maps.cgroup_slots()
                .into_iter()
                .filter(|(_, slot)| *slot != DEFAULT_SLOT && *slot < MAX_CLASSES)
                .collect()
        } else {
            maps.reset_state(DEFAULT_SLOT, &cfg)?;
            BTreeMap::new()
        };
        maps.write_class(DEFAULT_SLOT, &cfg)?;
        maps.write_global(&global)?;
        let default = Class::new(
            None,
            default_quota,
            default_guarantee,
            DEFAULT_SLOT,
            cfg,
            maps,
        )?;
        Ok(Self {
            dir,
            label: format!("{} {dir}", settings.interface),
            capacity,
            default_rate,
            global,
            default,
            classes: BTreeMap::new(),
            free: Vec::new(),
            quarantine: Vec::new(),
            next_slot: adopted.values().max().map_or(DEFAULT_SLOT, |m| *m) + 1,
            slot_limit: settings.max_quotas.clamp(1, MAX_QUOTAS) + 1,
            adopted,
            hold_at_alloc_until: None,
        })
    }

    /// Ends the adoption: cgroups of the earlier daemon that no quota
    /// claimed are unmapped, their slots and the gaps between adopted
    /// slots become free.
    fn finish_adoption(&mut self, dp: &mut Datapath) -> Result<(), NetError> {
        let maps = dp.maps(self.dir);
        let dropped = !self.adopted.is_empty();
        for (id, slot) in std::mem::take(&mut self.adopted) {
            maps.unmap_cgroup(id)?;
            maps.write_class(slot, &ClassConfig::default())?;
            info!(cgroup_id = id, dir = %self.dir, slot, "dropped an adopted class no quota claims");
        }
        let used: Vec<u32> = self.classes.values().map(|c| c.slot).collect();
        for slot in DEFAULT_SLOT + 1..self.next_slot {
            // Neither in use nor already waiting to be: a gap the earlier
            // daemon left.
            if !used.contains(&slot)
                && !self.free.contains(&slot)
                && !self.quarantine.iter().any(|(_, s)| *s == slot)
            {
                maps.write_class(slot, &ClassConfig::default())?;
                self.quarantine.push((Instant::now(), slot));
            }
        }
        if dropped {
            // Sockets cached on the dropped classes are classified again.
            self.global.generation += 1;
            maps.write_global(&self.global)?;
        }
        Ok(())
    }

    /// Validates and admits a quota without applying it.
    fn check(&self, name: &str, quota: &DirQuota) -> Result<(), NetError> {
        quota.validate(self.dir, self.capacity)?;
        let others = self
            .classes
            .values()
            .filter(|c| c.name() != name)
            .map(|c| c.quota.rate.bits_per_sec())
            .chain(std::iter::once(
                self.default_rate.map_or(0, Rate::bits_per_sec),
            ));
        policy::admit(
            &self.label,
            self.capacity.bits_per_sec(),
            others,
            quota.rate.bits_per_sec(),
        )?;
        Ok(())
    }

    fn set(
        &mut self,
        dp: &mut Datapath,
        tuning: &Tuning,
        cg: &CgroupRef,
        quota: DirQuota,
    ) -> Result<(), NetError> {
        self.check(&cg.name, &quota)?;
        let capacity = bytes(self.capacity);
        let ceil = quota.ceil.map(bytes).unwrap_or(capacity);
        let dir = self.dir;
        let flags = self.global.flags;
        if let Some(c) = self.classes.get_mut(&cg.name) {
            if c.cgroup.as_ref().is_some_and(|old| old.id == cg.id) {
                if c.quota == quota {
                    // Unchanged (a config quota the state file repeats):
                    // the class keeps what the controller gave it.
                    return Ok(());
                }
                let cfg = sized_gains(
                    policy::class_params(
                        bytes(quota.rate),
                        ceil,
                        quota.priority,
                        0,
                        c.flows,
                        c.flow_even,
                        tuning,
                    ),
                    tuning,
                    c.prev.rtt_us,
                    flags,
                );
                dp.maps(dir).write_class(c.slot, &cfg)?;
                c.cfg = cfg;
                c.quota = quota;
                c.guarantee = bytes(quota.rate);
                debug!(cgroup = %cg.name, %dir, slot = c.slot, "net quota changed");
                return Ok(());
            }
            // Same name, new directory: start over.
            self.remove(dp, &cg.name)?;
        }
        // The slot an earlier daemon gave this cgroup keeps its buckets and
        // counters (enforcement continues across the restart).
        let (slot, fresh) = match self.adopted.remove(&cg.id) {
            Some(slot) => (slot, false),
            None => (self.take_slot()?, true),
        };
        let maps = dp.maps(dir);
        // An adopted slot's round trip is its flows'; a fresh one has none.
        let rtt_us = if fresh {
            0
        } else {
            maps.read_state(slot).map_or(0, |st| st.rtt_us)
        };
        let mut cfg = sized_gains(
            policy::class_params(bytes(quota.rate), ceil, quota.priority, 0, UNIT, 0, tuning),
            tuning,
            rtt_us,
            flags,
        );
        // An adopted class with the same quota goes on with the parameters
        // the earlier daemon gave it (its borrowed share, its flow split):
        // fresh ones would jolt its flows until the next control steps.
        let kept = if fresh {
            None
        } else {
            maps.read_class(slot).ok().filter(|old| {
                old.active != 0
                    && (old.guarantee, old.ceil, old.priority)
                        == (cfg.guarantee, cfg.ceil, cfg.priority)
            })
        };
        if let Some(old) = kept {
            cfg = old;
        }
        let applied = (|| {
            if fresh {
                maps.reset_state(slot, &cfg)?;
            }
            if kept.is_none() {
                maps.write_class(slot, &cfg)?;
            }
            if fresh {
                maps.map_cgroup(cg.id, slot)?;
                self.global.generation += 1;
                maps.write_global(&self.global)?;
            }
            Ok(())
        })();
        if let Err(e) = applied {
            // Leave nothing half-applied (an adopted class is left as the
            // earlier daemon had it, still waiting to be claimed).
            if !fresh {
                self.adopted.insert(cg.id, slot);
                return Err(e);
            }
            let _ = maps.unmap_cgroup(cg.id);
            let _ = maps.write_class(slot, &ClassConfig::default());
            self.free.push(slot);
            return Err(e);
        }
        let mut class = Class::new(Some(cg.clone()), quota, bytes(quota.rate), slot, cfg, maps)?;
        if kept.is_some() {
            class.resume_from(&cfg);
        }
        self.classes.insert(cg.name.clone(), class);
        info!(cgroup = %cg.name, id = cg.id, %dir, slot, rate = %quota.rate, "net quota set");
        Ok(())
    }

    /// Removes a cgroup's class. Its traffic falls back to the default class.
    fn remove(&mut self, dp: &mut Datapath, name: &str) -> Result<bool, NetError> {
        let Some(c) = self.classes.remove(name) else {
            return Ok(false);
        };
        let maps = dp.maps(self.dir);
        if let Some(cg) = &c.cgroup {
            maps.unmap_cgroup(cg.id)?;
        }
        maps.write_class(c.slot, &ClassConfig::default())?;
        self.global.generation += 1;
        maps.write_global(&self.global)?;
        self.quarantine.push((Instant::now(), c.slot));
        info!(cgroup = name, dir = %self.dir, slot = c.slot, "net quota removed");
        Ok(true)
    }

    fn guaranteed_bits(&self) -> u64 {
        self.classes
            .values()
            .map(|c| c.quota.rate.bits_per_sec())
            .sum::<u64>()
            + self.default_rate.map_or(0, Rate::bits_per_sec)
    }

    fn take_slot(&mut self) -> Result<u32, NetError> {
        let now = Instant::now();
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .quarantine
            .drain(..)
            .partition(|(t, _)| now.duration_since(*t) >= SLOT_QUARANTINE);
        self.quarantine = waiting;
        self.free.extend(ready.into_iter().map(|(_, s)| s));
        if let Some(s) = self.free.pop() {
            return Ok(s);
        }
        if self.next_slot < self.slot_limit {
            self.next_slot += 1;
            return Ok(self.next_slot - 1);
        }
        Err(NetError::NoSlots(self.slot_limit - 1))
    }

    /// One control step: measure every class, share the spare capacity,
    /// update the datapath where it moved.
    fn tick(
        &mut self,
        dp: &mut Datapath,
        tuning: &Tuning,
        dt_ns: u64,
        now_ns: u64,
        epoch_due: bool,
    ) -> Result<(), NetError> {
        let capacity = bytes(self.capacity);
        let maps = dp.maps(self.dir);
        let mut demands = Vec::with_capacity(self.classes.len() + 1);
        let mut waking = Vec::with_capacity(self.classes.len() + 1);
        for c in std::iter::once(&mut self.default).chain(self.classes.values_mut()) {
            let st = maps.read_state(c.slot)?;
            let ct = maps.read_counters(c.slot)?;
            let (wanted, waking_estimate) = c.observe(st, ct, dt_ns, now_ns, epoch_due, capacity);
            demands.push(wanted);
            waking.push(waking_estimate);
        }
        if std::iter::once(&self.default)
            .chain(self.classes.values())
            .any(|c| c.receives_unheld(now_ns))
        {
            self.hold_at_alloc_until = Some(now_ns + policy::HOLD_AT_ALLOC_NS);
        }
        let hold_at_alloc = self.hold_at_alloc_until.is_some_and(|t| now_ns < t);
        let windows_hold =
            self.global.flags & (GLOBAL_RECEIVED | GLOBAL_ACK_PACING) == GLOBAL_RECEIVED;
        let window_classes: Vec<policy::WindowClass> = std::iter::once(&self.default)
            .chain(self.classes.values())
            .map(|c| policy::WindowClass {
                alloc: c.cfg.alloc as f64,
                rate: c.rate,
                mult: c.window_integral,
                steered: windows_hold
                    && !hold_at_alloc
                    && c.unheld_since.is_none()
                    && c.busy_long_enough(now_ns)
                    && c.cfg.alloc > 0
                    && c.rate > 0.0
                    && !policy::ceiling_binds(c.cfg.alloc, c.ceil(capacity), capacity),
                wants_less: c.wants_less_since.is_some(),
            })
            .collect();
        let window_mults = policy::window_mults(&window_classes, dt_ns);
        let shares = policy::share_spare_waking(capacity, &demands, &waking);
        for (((c, extra), window_mult), wanted) in std::iter::once(&mut self.default)
            .chain(self.classes.values_mut())
            .zip(shares)
            .zip(window_mults)
            .zip(&demands)
        {
            // Held at its allocation beside UDP: its windows are steered to
            // that allocation on their own (`policy::held_window_mult`).
            let held = hold_at_alloc && c.unheld_since.is_none();
            c.held = held;
            let ceiling_binds = policy::ceiling_binds(c.cfg.alloc, c.ceil(capacity), capacity);
            let window_mult = if held && windows_hold && c.busy_long_enough(now_ns) {
                c.held_steered_ns = Some(now_ns);
                let target = policy::held_target(c.cfg.alloc, c.ceil(capacity), ceiling_binds);
                policy::held_window_mult(c.window_integral, c.rate, target, dt_ns)
            } else if held {
                policy::held_window_rest(c.window_integral, c.held_steered_ns, now_ns)
            } else if windows_hold && c.unheld_since.is_none() && ceiling_binds {
                // Held at its configured ceiling by its windows, not by
                // its ceiling bucket's marks and drops; a silence (a
                // retransmission timeout) keeps where they were steered.
                c.held_steered_ns = None;
                if c.busy_long_enough(now_ns) {
                    policy::ceiling_window_mult(
                        c.window_integral,
                        c.rate,
                        c.ceil(capacity) as f64,
                        c.policed,
                        dt_ns,
                    )
                } else {
                    policy::window_mult_kept(c.window_integral)
                }
            } else {
                c.held_steered_ns = None;
                window_mult
            };
            c.window_integral = window_mult.integral;
            let ceil = policy::datapath_ceil(
                c.ceil(capacity),
                c.guarantee.saturating_add(extra),
                held,
                held && windows_hold,
            );
            let mut cfg = policy::class_params(
                c.guarantee,
                ceil,
                c.quota.priority,
                extra,
                c.flows,
                c.flow_even,
                tuning,
            );
            if windows_hold || ceil < c.ceil(capacity) {
                cfg.window_mult = ((window_mult.applied * UNIT as f64) as u64).max(1);
            }
            let cfg = sized_gains(cfg, tuning, c.prev.rtt_us, self.global.flags);
            // One line per class and step (10 ms) at trace level: what the
            // allocator saw and decided, for tracing lending at a finer grain
            // than `net show` can be polled (`log = "qos::alloc=trace"`).
            // demand_bps -1: as much as it gets. The allocation is what it
            // decided; the datapath keeps the one before while an adopted
            // class settles or the move is too small to write.
            trace!(
                target: "qos::alloc",
                dir = %self.dir,
                cgroup = c.name(),
                rate_bps = (c.rate * 8.0) as u64,
                fill = c.fill,
                demand_bps = wanted.demand.map_or(-1, |d| d.saturating_mul(8) as i64),
                wants_less = c.wants_less_since.is_some(),
                silent_ticks = c.silent_ticks,
                policed = c.policed,
                alloc_bps = cfg.alloc.saturating_mul(8),
                ceil_bps = cfg.ceil.saturating_mul(8),
                window_mult = window_mult.applied,
                flows = c.flows as f64 / UNIT as f64,
                "class step"
            );
            if c.settle_until.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            c.settle_until = None;
            if policy::worth_update(&c.cfg, &cfg) {
                maps.write_class(c.slot, &cfg)?;
                c.cfg = cfg;
            }
        }
        if epoch_due {
            self.global.epoch += 1;
            maps.write_global(&self.global)?;
        }
        Ok(())
    }

    fn status(&self) -> Vec<NetClassStatus> {
        std::iter::once(&self.default)
            .chain(self.classes.values())
            .map(|c| NetClassStatus {
                cgroup: c.name().to_owned(),
                cgroup_id: c.cgroup.as_ref().map_or(0, |cg| cg.id),
                slot: c.slot,
                rate: if c.guarantee == 0 {
                    "0".into()
                } else {
                    c.quota.rate.to_string()
                },
                ceil: c.quota.ceil.unwrap_or(self.capacity).to_string(),
                priority: c.quota.priority,
                alloc_bps: c.cfg.alloc * 8,
                rate_bps: (c.rate * 8.0) as u64,
                bytes: c.counters.bytes,
                packets: c.counters.packets,
                borrowed_bytes: c.counters.borrowed_bytes,
                over_bytes: c.counters.over_bytes,
                ce_marks: c.counters.ce_marks,
                drops: c.counters.drops,
                drop_bytes: c.counters.drop_bytes,
                own_tokens: c.prev.own,
                borrow_tokens: c.prev.borrow,
                ceil_tokens: c.prev.ceil,
                // Where user space sizes the windows, its multiplier is
                // the one that acts.
                pacing_multiplier: if c.cfg.window_mult != 0 {
                    c.cfg.window_mult
                } else {
                    c.prev.mult
                } as f64
                    / UNIT as f64,
                flows: c.prev.flows_open,
                active_flows: c.flows as f64 / UNIT as f64,
                pacing_updates: c.counters.pacing_updates,
                window_clamps: c.counters.window_clamps,
                initial_windows: c.counters.initial_windows,
                unheld_bytes: c.counters.unheld_bytes,
                held_at_alloc: c.held,
                rtt_us: c.prev.rtt_us,
                window_rtt_us: c.prev.window_rtt_us,
            })
            .collect()
    }

    fn set_flags(&mut self, dp: &mut Datapath, flags: u32) -> Result<(), NetError> {
        self.global.flags = flags;
        dp.maps(self.dir).write_global(&self.global)
    }
}

/// Flags of a direction's `NetGlobal` while shaping.
fn running_flags(settings: &ShaperSettings) -> u32 {
    GLOBAL_ENABLED
        | if settings.replace_bbr {
            GLOBAL_REPLACE_BBR
        } else {
            0
        }
}

/// The shaper of one interface: egress, and ingress when configured.
#[derive(Debug)]
pub struct Shaper {
    settings: ShaperSettings,
    dp: Datapath,
    egress: ClassTable,
    ingress: Option<ClassTable>,
    /// Applied quotas, by cgroup name.
    quotas: BTreeMap<String, (CgroupRef, NetQuota)>,
    last_tick: Instant,
    last_epoch: Instant,
    last_scan: Option<Instant>,
    /// The shaped interface was found missing (reported once).
    iface_missing: bool,
    /// Whether received TCP flows are paced by their ACKs, or why not.
    ack_pacing: AckQdisc,
}

/// What [`Shaper::check_interface`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterfaceEvent {
    Unchanged,
    /// Gone (first seen missing now).
    Missing,
    /// Re-created; the datapath is attached to it (new ifindex).
    Followed(u32),
    /// Re-created, but attaching failed (retried at the next check).
    Failed(String),
}

impl Shaper {
    /// Loads and attaches the datapath on `settings.interface` and starts
    /// shaping with only the default classes.
    pub fn start(settings: ShaperSettings, cgroup2_root: &Path) -> Result<Self, NetError> {
        settings
            .container_interfaces
            .validate()
            .map_err(NetError::InvalidQuota)?;
        if settings.default_priority > LOWEST_PRIORITY {
            return Err(NetError::InvalidQuota(format!(
                "default priority {} is out of range 0..={LOWEST_PRIORITY}",
                settings.default_priority
            )));
        }
        if !UPSTREAM_BUFFER_RANGE.contains(&settings.ingress_upstream_buffer) {
            return Err(NetError::InvalidSetting(format!(
                "ingress upstream buffer of {} bytes is outside {}..={} (16 KiB..256 MiB)",
                settings.ingress_upstream_buffer,
                UPSTREAM_BUFFER_RANGE.start(),
                UPSTREAM_BUFFER_RANGE.end()
            )));
        }
        if settings.ingress_capacity.is_none() && settings.ingress_default_rate.is_some() {
            return Err(NetError::InvalidQuota(
                "an ingress default rate needs an ingress capacity".into(),
            ));
        }
        let mut dp = Datapath::open(
            &settings.interface,
            cgroup2_root,
            settings.pin_root.as_deref(),
        )?;
        let flags = running_flags(&settings);
        let egress = ClassTable::start(
            Direction::Egress,
            settings.capacity,
            settings.default_rate,
            flags,
            &settings,
            &mut dp,
        )?;
        let mut ack_pacing = AckQdisc::Unavailable("ingress is not shaped".into());
        let ingress = match settings.ingress_capacity {
            Some(cap) => {
                let mut flags = flags | GLOBAL_RECEIVED;
                if settings.ingress_clamp_ecn {
                    flags |= GLOBAL_CLAMP_ECN;
                }
                ack_pacing = if settings.ingress_ack_pacing {
                    dp.ensure_ack_qdisc()
                } else {
                    AckQdisc::Unavailable("turned off ([net] ingress_ack_pacing)".into())
                };
                if ack_pacing.is_ready() {
                    flags |= GLOBAL_ACK_PACING;
                } else if settings.ingress_ack_pacing {
                    warn!(iface = %settings.interface, reason = %ack_pacing.describe(),
                        "ingress ACK pacing unavailable: received TCP flows are held by their receive windows");
                }
                let t = ClassTable::start(
                    Direction::Ingress,
                    cap,
                    settings.ingress_default_rate,
                    flags,
                    &settings,
                    &mut dp,
                )?;
                if !ack_pacing.is_ready()
                    && policy::queue_floor_exceeds_half_buffer(
                        bytes(cap),
                        settings.ingress_upstream_buffer,
                    )
                {
                    warn!(iface = %settings.interface,
                        buffer = settings.ingress_upstream_buffer,
                        queue_us = t.global.shared_queue_us,
                        "half the ingress upstream buffer takes less than the {} µs floor at the \
                         ingress capacity: receive windows are sized for the floor and may overflow it",
                        t.global.shared_queue_us);
                }
                dp.attach_ingress()?;
                Some(t)
            }
            None => {
                // An earlier daemon's pinned ingress half may still be
                // enabled: turn it off (the pacer then lifts the window
                // clamps it set as those sockets send).
                let maps = dp.maps(Direction::Ingress);
                let mut g = maps.read_global()?;
                if g.flags & GLOBAL_ENABLED != 0 {
                    g.flags = GLOBAL_RELEASE;
                    maps.write_global(&g)?;
                }
                None
            }
        };
        let now = Instant::now();
        let mut shaper = Self {
            settings,
            dp,
            egress,
            ingress,
            quotas: BTreeMap::new(),
            last_tick: now,
            last_epoch: now,
            last_scan: None,
            iface_missing: false,
            ack_pacing,
        };
        shaper.scan_interfaces();
        info!(
            iface = %shaper.settings.interface,
            egress = %shaper.settings.capacity,
            ingress = %shaper.settings.ingress_capacity.map_or("off".into(), |r| r.to_string()),
            "shaping on"
        );
        Ok(shaper)
    }

    pub fn settings(&self) -> &ShaperSettings {
        &self.settings
    }

    pub fn datapath(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    fn table(&self, dir: Direction) -> Option<&ClassTable> {
        match dir {
            Direction::Egress => Some(&self.egress),
            Direction::Ingress => self.ingress.as_ref(),
        }
    }

    /// The quota of a configured cgroup.
    pub fn quota(&self, name: &str) -> Option<NetQuota> {
        self.quotas.get(name).map(|(_, q)| *q)
    }

    /// Validates and admits a quota without applying it.
    pub fn check(&self, name: &str, quota: &NetQuota) -> Result<(), NetError> {
        quota.validate_form()?;
        for dir in Direction::ALL {
            let Some(q) = quota.dir(dir) else { continue };
            match self.table(dir) {
                Some(t) => t.check(name, &q)?,
                None => return Err(NetError::IngressNotConfigured),
            }
        }
        Ok(())
    }

    /// Applies (or changes) the quota of a cgroup, in both directions: a
    /// direction the quota has no rate for is not shaped for it. Nothing
    /// changes when it is refused.
    pub fn set(&mut self, cg: &CgroupRef, quota: NetQuota) -> Result<(), NetError> {
        self.check(&cg.name, &quota)?;
        let old = self.quota(&cg.name);
        let mut done: Vec<Direction> = Vec::new();
        for dir in Direction::ALL {
            let result = self.set_dir(dir, cg, quota.dir(dir));
            if let Err(e) = result {
                // Put back what this call changed.
                for d in done {
                    let _ = self.set_dir(d, cg, old.and_then(|q| q.dir(d)));
                }
                return Err(e);
            }
            done.push(dir);
        }
        self.quotas.insert(cg.name.clone(), (cg.clone(), quota));
        Ok(())
    }

    fn set_dir(
        &mut self,
        dir: Direction,
        cg: &CgroupRef,
        quota: Option<DirQuota>,
    ) -> Result<(), NetError> {
        let tuning = self.settings.tuning;
        let table = match dir {
            Direction::Egress => &mut self.egress,
            Direction::Ingress => match self.ingress.as_mut() {
                Some(t) => t,
                None if quota.is_none() => return Ok(()),
                None => return Err(NetError::IngressNotConfigured),
            },
        };
        match quota {
            Some(q) => table.set(&mut self.dp, &tuning, cg, q),
            None => table.remove(&mut self.dp, &cg.name).map(|_| ()),
        }
    }

    /// Removes a cgroup's quota. Its traffic falls back to the default
    /// classes.
    pub fn remove(&mut self, name: &str) -> Result<bool, NetError> {
        if self.quotas.remove(name).is_none() {
            return Ok(false);
        }
        self.egress.remove(&mut self.dp, name)?;
        if let Some(t) = self.ingress.as_mut() {
            t.remove(&mut self.dp, name)?;
        }
        Ok(true)
    }

    /// Configured cgroups whose directory is gone (or was replaced).
    pub fn vanished(&self) -> Vec<String> {
        self.quotas
            .iter()
            .filter(|(_, (cg, _))| !cg.exists())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Entries in the datapath's cgroup maps, both directions (leak checks).
    pub fn cgroup_map_entries(&self) -> usize {
        Direction::ALL
            .iter()
            .map(|d| self.dp.maps_ref(*d).cgroup_entries())
            .sum()
    }

    /// Number of configured cgroups (the default classes not counted).
    pub fn configured(&self) -> usize {
        self.quotas.len()
    }

    /// Guaranteed egress bits per second, default class included.
    pub fn guaranteed_bits(&self) -> u64 {
        self.egress.guaranteed_bits()
    }

    /// Guaranteed ingress bits per second, when ingress is shaped.
    pub fn ingress_guaranteed_bits(&self) -> Option<u64> {
        self.ingress.as_ref().map(ClassTable::guaranteed_bits)
    }

    pub fn tagged_interfaces(&self) -> Vec<String> {
        self.dp.tagged_interfaces()
    }

    /// One control step of both directions. Call every [`TICK`].
    pub fn tick(&mut self) -> Result<(), NetError> {
        let now = Instant::now();
        let dt = now.duration_since(self.last_tick);
        if dt.is_zero() {
            return Ok(());
        }
        self.last_tick = now;
        let dt_ns = dt.as_nanos() as u64;
        let epoch_due = now.duration_since(self.last_epoch) >= EPOCH;
        if epoch_due {
            self.last_epoch = now;
        }
        let now_ns = monotonic_ns();
        let tuning = self.settings.tuning;
        self.egress
            .tick(&mut self.dp, &tuning, dt_ns, now_ns, epoch_due)?;
        if let Some(t) = self.ingress.as_mut() {
            t.tick(&mut self.dp, &tuning, dt_ns, now_ns, epoch_due)?;
        }
        if self.last_scan.is_none_or(|t| now.duration_since(t) >= SCAN) {
            self.scan_interfaces();
        }
        Ok(())
    }

    /// Checks the shaped interface: gone (reported once, until it is back),
    /// or re-created (the datapath follows it). Returns what happened, for
    /// the daemon to log and count.
    pub fn check_interface(&mut self) -> InterfaceEvent {
        match self.dp.follow_interface() {
            Ok(None) => {
                self.iface_missing = false;
                InterfaceEvent::Unchanged
            }
            Ok(Some(ifindex)) => {
                self.iface_missing = false;
                if self.ingress.is_some() && self.settings.ingress_ack_pacing {
                    // The new device has the default qdisc again.
                    let state = self.dp.ensure_ack_qdisc();
                    if let Err(e) = self.set_ack_pacing(state) {
                        return InterfaceEvent::Failed(e.to_string());
                    }
                }
                let mut tables: Vec<&mut ClassTable> = vec![&mut self.egress];
                if let Some(t) = self.ingress.as_mut() {
                    tables.push(t);
                }
                for t in tables {
                    t.global.shaped_ifindex = ifindex;
                    t.global.generation += 1;
                    if let Err(e) = self.dp.maps(t.dir).write_global(&t.global) {
                        return InterfaceEvent::Failed(e.to_string());
                    }
                }
                InterfaceEvent::Followed(ifindex)
            }
            Err(NetError::NoInterface(_)) if self.iface_missing => InterfaceEvent::Unchanged,
            Err(NetError::NoInterface(name)) => {
                self.iface_missing = true;
                warn!(iface = %name, "shaped interface is gone; shaping resumes when it is back");
                InterfaceEvent::Missing
            }
            Err(e) => {
                warn!(iface = %self.settings.interface, error = %e, "re-attaching to the re-created interface");
                InterfaceEvent::Failed(e.to_string())
            }
        }
    }

    /// Attaches the tagger to new container-facing interfaces and forgets
    /// vanished ones.
    pub fn scan_interfaces(&mut self) {
        self.last_scan = Some(Instant::now());
        self.keep_ack_qdisc();
        let all = ifaces::list(Path::new("/sys/class/net"));
        let wanted = self.settings.container_interfaces.select(
            &all,
            &self.settings.interface,
            ifaces::driver,
        );
        self.dp.prune_taggers(&wanted);
        for name in wanted.values() {
            if let Err(e) = self.dp.attach_tagger(name) {
                // Interfaces come and go; a failure here is not fatal.
                warn!(iface = %name, error = %e, "cannot attach the container tagger");
            }
        }
    }

    /// Keeps ACK pacing in step with the qdisc (every interface scan): when
    /// our fq was replaced or deleted (by hand, by a network manager) ACK
    /// pacing goes off at once; after a failure that may pass (the default
    /// qdisc is back, the device was just created) fq is installed again.
    fn keep_ack_qdisc(&mut self) {
        if self.ingress.is_none() {
            return;
        }
        let iface = &self.settings.interface;
        let next = match &self.ack_pacing {
            AckQdisc::Ready { .. } => match qdisc::root(iface) {
                Ok(r) if !r.is_ours() => {
                    warn!(iface = %iface, now = %format!("{} {}", r.kind, r.handle),
                        "the fq qdisc ACK pacing needs was replaced; ACK pacing off");
                    AckQdisc::Failed(format!(
                        "fq at the root of {iface} was replaced by {} {}",
                        r.kind, r.handle
                    ))
                }
                // Ours, or not readable now (the device is being replaced:
                // `check_interface` follows that).
                _ => return,
            },
            AckQdisc::Failed(_) => self.dp.ensure_ack_qdisc(),
            AckQdisc::Unavailable(_) => return,
        };
        if let Err(e) = self.set_ack_pacing(next) {
            warn!(iface = %self.settings.interface, error = %e, "switching ingress ACK pacing");
        }
    }

    /// Records how ACK pacing stands and sets the datapath's flag to match.
    fn set_ack_pacing(&mut self, state: AckQdisc) -> Result<(), NetError> {
        self.ack_pacing = state;
        let Some(t) = self.ingress.as_mut() else {
            return Ok(());
        };
        let flags = if self.ack_pacing.is_ready() {
            t.global.flags | GLOBAL_ACK_PACING
        } else {
            t.global.flags & !GLOBAL_ACK_PACING
        };
        if flags == t.global.flags {
            return Ok(());
        }
        t.global.flags = flags;
        self.dp.maps(t.dir).write_global(&t.global)?;
        info!(iface = %self.settings.interface, state = %self.ack_pacing.describe(), "ingress ACK pacing");
        Ok(())
    }

    pub fn status(&self) -> NetStatus {
        let egress_maps = self.dp.maps_ref(Direction::Egress);
        let ingress = self.ingress.as_ref().map(|t| {
            let maps = self.dp.maps_ref(Direction::Ingress);
            IngressStatus {
                capacity: t.capacity.to_string(),
                capacity_bps: t.capacity.bits_per_sec(),
                classes: t.status(),
                pool_tokens: maps.read_pool().map(|p| p.tokens).unwrap_or(0),
                ack_pacing: self.ack_pacing.describe(),
                upstream_buffer_bytes: self.settings.ingress_upstream_buffer,
                shared_queue_us: t.global.shared_queue_us,
            }
        });
        NetStatus {
            interface: self.settings.interface.clone(),
            capacity: self.settings.capacity.to_string(),
            capacity_bps: bytes(self.settings.capacity) * 8,
            classes: self.egress.status(),
            tagged_interfaces: self.dp.tagged_interfaces(),
            pool_tokens: egress_maps.read_pool().map(|p| p.tokens).unwrap_or(0),
            ingress,
            programs: self
                .dp
                .program_stats()
                .into_iter()
                .map(Into::into)
                .collect(),
        }
    }

    /// Ends a start over an adopted datapath, once every quota is applied:
    /// drops the earlier daemon's classes that no quota claimed and its
    /// attachments nothing uses any more, then retires the pinned datapaths
    /// of other builds (this one is attached by now).
    pub fn finish_start(&mut self) -> Result<(), NetError> {
        // Each step on its own: another build's datapath must go even when
        // an adopted class could not be dropped.
        let egress = self.egress.finish_adoption(&mut self.dp);
        let ingress = match self.ingress.as_mut() {
            Some(t) => t.finish_adoption(&mut self.dp),
            None => Ok(()),
        };
        self.dp.drop_unclaimed();
        self.dp.retire_other_generations();
        egress.and(ingress)
    }

    /// Leaves shaping running without a controller (a daemon restart): the
    /// pinned datapath goes on with its last rates until the next daemon
    /// adopts it. Without pins this is [`Shaper::stop`].
    pub fn keep(self) {
        if self.settings.pin_root.is_none() {
            self.stop();
            return;
        }
        self.dp.keep();
    }

    /// Stops shaping: the datapath lets everything pass and the pacer lifts
    /// the pacing and window clamps of flows as they send; then it
    /// detaches (and its pins go). Flows that stay silent through the grace
    /// period keep their last pacing rate and receive-window clamp until
    /// they close (a received flow from afar that never started: its share
    /// of its class's round trip, `policy::unstarted_window_clamp`).
    pub fn stop(mut self) {
        let mut tables: Vec<&mut ClassTable> = vec![&mut self.egress];
        if let Some(t) = self.ingress.as_mut() {
            tables.push(t);
        }
        for t in tables {
            if let Err(e) = t.set_flags(&mut self.dp, GLOBAL_RELEASE) {
                warn!(error = %e, dir = %t.dir, "disabling the datapath");
            }
        }
        std::thread::sleep(RELEASE_GRACE);
        self.dp.detach();
        info!("shaping off");
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
