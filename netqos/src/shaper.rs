//! The egress shaper: class bookkeeping around the datapath and the control
//! loop that shares the spare capacity.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use qos_common::{
    net::{
        ClassConfig, ClassCounters, ClassState, DEFAULT_SLOT, GLOBAL_ENABLED, GLOBAL_RELEASE,
        GLOBAL_REPLACE_BBR, LOWEST_PRIORITY, MAX_CLASSES, NetGlobal,
    },
    policy::{UNIT, class_fill, earned},
};
use qos_core::{CgroupRef, Rate};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    NetError,
    datapath::{Datapath, ProgramStats},
    ifaces::{self, ContainerInterfaces},
    policy::{self, ClassDemand, Observation, Tuning},
};

/// How often the allocator runs.
pub const TICK: Duration = Duration::from_millis(10);
/// Activity epoch over which flows are counted.
const EPOCH: Duration = Duration::from_millis(100);
/// How often new container interfaces are looked for.
const SCAN: Duration = Duration::from_secs(1);
/// Time constant of the measured rates.
const RATE_TAU_NS: u64 = 50_000_000;
/// A class must look like it wants less for this long before the allocator
/// lends its share out (prevents allocation flapping on noisy samples).
const DEMAND_HOLD_NS: u64 = 100_000_000;
/// A class that sent nothing for this many control steps is idle at once.
const SILENT_TICKS: u32 = 3;
/// How long the pacer gets to lift pacing from active flows at shutdown.
const RELEASE_GRACE: Duration = Duration::from_millis(200);
/// A freed slot is not reused before sockets cached on it were reclassified.
const SLOT_QUARANTINE: Duration = Duration::from_secs(2);

/// Host configuration of the egress shaper.
#[derive(Clone, Debug)]
pub struct ShaperSettings {
    pub interface: String,
    pub capacity: Rate,
    /// Guarantee of the default class (traffic of cgroups without a quota);
    /// None: best effort, it only gets capacity the others leave.
    pub default_rate: Option<Rate>,
    pub default_priority: u32,
    pub container_interfaces: ContainerInterfaces,
    /// Switch shaped BBR flows to CUBIC (see `GLOBAL_REPLACE_BBR`).
    pub replace_bbr: bool,
    pub tuning: Tuning,
}

/// A cgroup's network quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetQuota {
    /// Guaranteed rate.
    pub rate: Rate,
    /// Most it may use when others leave capacity idle; the interface
    /// capacity when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceil: Option<Rate>,
    /// 0 (highest) ..= 7.
    #[serde(default)]
    pub priority: u32,
}

impl NetQuota {
    /// Checks the quota against the shaped interface's capacity.
    pub fn validate(&self, capacity: Rate) -> Result<(), NetError> {
        if self.priority > LOWEST_PRIORITY {
            return Err(NetError::InvalidQuota(format!(
                "priority {} is out of range; use 0 (highest) to {LOWEST_PRIORITY}",
                self.priority
            )));
        }
        if self.rate > capacity {
            return Err(NetError::InvalidQuota(format!(
                "rate {} exceeds the interface capacity {capacity}",
                self.rate
            )));
        }
        if let Some(ceil) = self.ceil {
            if ceil < self.rate {
                return Err(NetError::InvalidQuota(format!(
                    "ceil {ceil} is below the guaranteed rate {}",
                    self.rate
                )));
            }
            if ceil > capacity {
                return Err(NetError::InvalidQuota(format!(
                    "ceil {ceil} exceeds the interface capacity {capacity}"
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
    pub pacing_multiplier: f64,
    /// Open TCP flows that are paced.
    pub flows: u64,
    /// Flows the allocation is split over (app-limited flows count partly).
    pub active_flows: f64,
    pub pacing_updates: u64,
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
    quota: NetQuota,
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
    /// Flows acknowledged in the last three activity epochs (a flow stalled
    /// for an epoch still counts).
    recent_flows: [u64; 3],
}

impl Class {
    fn new(
        cgroup: Option<CgroupRef>,
        quota: NetQuota,
        guarantee: u64,
        slot: u32,
        cfg: ClassConfig,
        dp: &Datapath,
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
            recent_flows: [0; 3],
        })
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
    /// class wants next.
    fn observe(
        &mut self,
        st: ClassState,
        ct: ClassCounters,
        dt_ns: u64,
        now_ns: u64,
        epoch_due: bool,
        capacity: u64,
    ) -> ClassDemand {
        let d_bytes = ct.bytes.wrapping_sub(self.counters.bytes);
        self.rate = policy::ewma(
            self.rate,
            d_bytes as f64 * 1e9 / dt_ns as f64,
            dt_ns,
            RATE_TAU_NS,
        );
        // The datapath refills lazily, on packets: add what an idle class
        // earned since its last packet.
        let since = now_ns.saturating_sub(st.last_ns);
        let cfg = &self.cfg;
        let own = (st.own + earned(since, cfg.guarantee) as i64).min(cfg.depth as i64);
        let borrow =
            (st.borrow + earned(since, cfg.borrow_rate) as i64).min(cfg.borrow_depth as i64);
        let fill = class_fill(own, borrow, cfg);
        self.fill = policy::ewma(self.fill, fill as f64 / UNIT as f64, dt_ns, RATE_TAU_NS);
        if epoch_due {
            let act = ct.flow_activations.wrapping_sub(self.activations_mark);
            self.activations_mark = ct.flow_activations;
            self.recent_flows.rotate_right(1);
            self.recent_flows[0] = act;
            let act = self.recent_flows.iter().copied().max().unwrap_or(act);
            self.flows = policy::active_flows(act, st.flows_open);
        }
        self.silent_ticks = if d_bytes == 0 {
            self.silent_ticks.saturating_add(1)
        } else {
            0
        };
        let demand = if self.silent_ticks >= SILENT_TICKS {
            // Gone quiet: lend its share out now.
            self.wants_less_since = Some(now_ns);
            Some(0)
        } else {
            let obs = Observation {
                fill: self.fill,
                rate: self.rate,
                alloc: cfg.alloc,
                over_bytes: ct.over_bytes.wrapping_sub(self.counters.over_bytes),
                dropped_bytes: ct.drop_bytes.wrapping_sub(self.counters.drop_bytes),
                bytes: d_bytes,
            };
            policy::held_demand(
                policy::estimate_demand(&obs),
                &mut self.wants_less_since,
                now_ns,
                DEMAND_HOLD_NS,
            )
        };
        self.prev = st;
        self.counters = ct;
        ClassDemand {
            guarantee: self.guarantee,
            ceil: self.ceil(capacity),
            priority: self.quota.priority,
            demand,
        }
    }
}

/// The egress shaper of one interface.
#[derive(Debug)]
pub struct Shaper {
    settings: ShaperSettings,
    dp: Datapath,
    global: NetGlobal,
    default: Class,
    classes: BTreeMap<String, Class>,
    free: Vec<u32>,
    quarantine: Vec<(Instant, u32)>,
    next_slot: u32,
    last_tick: Instant,
    last_epoch: Instant,
    last_scan: Option<Instant>,
}

fn bytes(rate: Rate) -> u64 {
    rate.bytes_per_sec()
}

impl Shaper {
    /// Loads and attaches the datapath on `settings.interface` and starts
    /// shaping with only the default class.
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
        if let Some(r) = settings.default_rate.filter(|r| *r > settings.capacity) {
            return Err(NetError::InvalidQuota(format!(
                "default rate {r} exceeds the capacity {}",
                settings.capacity
            )));
        }
        let mut dp = Datapath::load(&settings.interface, cgroup2_root)?;
        let capacity = bytes(settings.capacity);
        let mut global = policy::global_params(capacity, dp.ifindex(), &settings.tuning);
        global.flags = GLOBAL_ENABLED
            | if settings.replace_bbr {
                GLOBAL_REPLACE_BBR
            } else {
                0
            };
        let default_guarantee = settings.default_rate.map(bytes).unwrap_or(0);
        let default_quota = NetQuota {
            // Only shown; the guarantee below is what counts.
            rate: settings.default_rate.unwrap_or(settings.capacity),
            ceil: None,
            priority: settings.default_priority,
        };
        let cfg = policy::class_params(
            default_guarantee,
            capacity,
            settings.default_priority,
            0,
            UNIT,
            &settings.tuning,
        );
        dp.reset_state(DEFAULT_SLOT, &cfg)?;
        dp.write_class(DEFAULT_SLOT, &cfg)?;
        dp.write_global(&global)?;
        let now = Instant::now();
        let default = Class::new(
            None,
            default_quota,
            default_guarantee,
            DEFAULT_SLOT,
            cfg,
            &dp,
        )?;
        let mut shaper = Self {
            settings,
            dp,
            global,
            default,
            classes: BTreeMap::new(),
            free: Vec::new(),
            quarantine: Vec::new(),
            next_slot: DEFAULT_SLOT + 1,
            last_tick: now,
            last_epoch: now,
            last_scan: None,
        };
        shaper.scan_interfaces();
        info!(
            iface = %shaper.settings.interface,
            capacity = %shaper.settings.capacity,
            "egress shaping on"
        );
        Ok(shaper)
    }

    pub fn settings(&self) -> &ShaperSettings {
        &self.settings
    }

    pub fn datapath(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    /// The quota of a configured cgroup.
    pub fn quota(&self, name: &str) -> Option<NetQuota> {
        self.classes.get(name).map(|c| c.quota)
    }

    /// Validates and admits a quota without applying it.
    pub fn check(&self, name: &str, quota: &NetQuota) -> Result<(), NetError> {
        quota.validate(self.settings.capacity)?;
        let others = self
            .classes
            .values()
            .filter(|c| c.name() != name)
            .map(|c| c.quota.rate.bits_per_sec())
            .chain(std::iter::once(
                self.settings.default_rate.map_or(0, Rate::bits_per_sec),
            ));
        policy::admit(
            &self.settings.interface,
            self.settings.capacity.bits_per_sec(),
            others,
            quota.rate.bits_per_sec(),
        )?;
        Ok(())
    }

    /// Applies (or changes) the quota of a cgroup. Nothing changes when it is
    /// refused.
    pub fn set(&mut self, cg: &CgroupRef, quota: NetQuota) -> Result<(), NetError> {
        self.check(&cg.name, &quota)?;
        let capacity = bytes(self.settings.capacity);
        let ceil = quota.ceil.map(bytes).unwrap_or(capacity);
        if let Some(c) = self.classes.get_mut(&cg.name) {
            if c.cgroup.as_ref().is_some_and(|old| old.id == cg.id) {
                let cfg = policy::class_params(
                    bytes(quota.rate),
                    ceil,
                    quota.priority,
                    0,
                    c.flows,
                    &self.settings.tuning,
                );
                self.dp.write_class(c.slot, &cfg)?;
                c.cfg = cfg;
                c.quota = quota;
                c.guarantee = bytes(quota.rate);
                debug!(cgroup = %cg.name, slot = c.slot, "net quota changed");
                return Ok(());
            }
            // Same name, new directory: start over.
            self.remove(&cg.name)?;
        }
        let slot = self.take_slot()?;
        let cfg = policy::class_params(
            bytes(quota.rate),
            ceil,
            quota.priority,
            0,
            UNIT,
            &self.settings.tuning,
        );
        let applied = (|| {
            self.dp.reset_state(slot, &cfg)?;
            self.dp.write_class(slot, &cfg)?;
            self.dp.map_cgroup(cg.id, slot)?;
            self.bump_generation()
        })();
        if let Err(e) = applied {
            // Leave nothing half-applied.
            let _ = self.dp.unmap_cgroup(cg.id);
            let _ = self.dp.write_class(slot, &ClassConfig::default());
            self.free.push(slot);
            return Err(e);
        }
        let class = Class::new(
            Some(cg.clone()),
            quota,
            bytes(quota.rate),
            slot,
            cfg,
            &self.dp,
        )?;
        self.classes.insert(cg.name.clone(), class);
        info!(cgroup = %cg.name, id = cg.id, slot, rate = %quota.rate, "net quota set");
        Ok(())
    }

    /// Removes a cgroup's quota. Its traffic falls back to the default class.
    pub fn remove(&mut self, name: &str) -> Result<bool, NetError> {
        let Some(c) = self.classes.remove(name) else {
            return Ok(false);
        };
        if let Some(cg) = &c.cgroup {
            self.dp.unmap_cgroup(cg.id)?;
        }
        self.dp.write_class(c.slot, &ClassConfig::default())?;
        self.bump_generation()?;
        self.quarantine.push((Instant::now(), c.slot));
        info!(cgroup = name, slot = c.slot, "net quota removed");
        Ok(true)
    }

    /// Configured cgroups whose directory is gone (or was replaced).
    pub fn vanished(&self) -> Vec<String> {
        self.classes
            .iter()
            .filter(|(_, c)| c.cgroup.as_ref().is_some_and(|cg| !cg.exists()))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Number of configured cgroups (the default class not counted).
    pub fn configured(&self) -> usize {
        self.classes.len()
    }

    /// Guaranteed bits per second, default class included.
    pub fn guaranteed_bits(&self) -> u64 {
        self.classes
            .values()
            .map(|c| c.quota.rate.bits_per_sec())
            .sum::<u64>()
            + self.settings.default_rate.map_or(0, Rate::bits_per_sec)
    }

    pub fn tagged_interfaces(&self) -> Vec<String> {
        self.dp.tagged_interfaces()
    }

    fn bump_generation(&mut self) -> Result<(), NetError> {
        self.global.generation += 1;
        self.dp.write_global(&self.global)
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
        if self.next_slot < MAX_CLASSES {
            self.next_slot += 1;
            return Ok(self.next_slot - 1);
        }
        Err(NetError::NoSlots(MAX_CLASSES))
    }

    /// One control step: measure every class, share the spare capacity,
    /// update the datapath where it moved. Call every [`TICK`].
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
        let capacity = bytes(self.settings.capacity);
        let now_ns = monotonic_ns();

        let mut demands = Vec::with_capacity(self.classes.len() + 1);
        for c in std::iter::once(&mut self.default).chain(self.classes.values_mut()) {
            let st = self.dp.read_state(c.slot)?;
            let ct = self.dp.read_counters(c.slot)?;
            demands.push(c.observe(st, ct, dt_ns, now_ns, epoch_due, capacity));
        }
        let shares = policy::share_spare(capacity, &demands);
        for (c, extra) in std::iter::once(&mut self.default)
            .chain(self.classes.values_mut())
            .zip(shares)
        {
            let cfg = policy::class_params(
                c.guarantee,
                c.ceil(capacity),
                c.quota.priority,
                extra,
                c.flows,
                &self.settings.tuning,
            );
            if policy::worth_update(&c.cfg, &cfg) {
                self.dp.write_class(c.slot, &cfg)?;
                c.cfg = cfg;
            }
        }
        if epoch_due {
            self.global.epoch += 1;
            self.dp.write_global(&self.global)?;
        }
        if self.last_scan.is_none_or(|t| now.duration_since(t) >= SCAN) {
            self.scan_interfaces();
        }
        Ok(())
    }

    /// Attaches the tagger to new container-facing interfaces and forgets
    /// vanished ones.
    pub fn scan_interfaces(&mut self) {
        self.last_scan = Some(Instant::now());
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

    pub fn status(&self) -> NetStatus {
        let capacity = bytes(self.settings.capacity);
        let classes = std::iter::once(&self.default)
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
                ceil: c.quota.ceil.unwrap_or(self.settings.capacity).to_string(),
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
                pacing_multiplier: c.prev.mult as f64 / UNIT as f64,
                flows: c.prev.flows_open,
                active_flows: c.flows as f64 / UNIT as f64,
                pacing_updates: c.counters.pacing_updates,
            })
            .collect();
        NetStatus {
            interface: self.settings.interface.clone(),
            capacity: self.settings.capacity.to_string(),
            capacity_bps: capacity * 8,
            classes,
            tagged_interfaces: self.dp.tagged_interfaces(),
            pool_tokens: self.dp.read_pool().map(|p| p.tokens).unwrap_or(0),
            programs: self
                .dp
                .program_stats()
                .into_iter()
                .map(Into::into)
                .collect(),
        }
    }

    /// Stops shaping: the datapath lets everything pass and the pacer lifts
    /// the pacing of flows as their acks arrive; then it detaches. Flows
    /// that stay silent through the grace period keep their last pacing
    /// rate until they close.
    pub fn stop(mut self) {
        self.global.flags = GLOBAL_RELEASE;
        if let Err(e) = self.dp.write_global(&self.global) {
            warn!(error = %e, "disabling the datapath");
        }
        std::thread::sleep(RELEASE_GRACE);
        self.dp.detach();
        info!("egress shaping off");
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
