//! Kernel-facing half of the shaper: loads the eBPF object, attaches the
//! programs, and reads and writes the maps. No policy here.

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, SockOps, TcAttachType,
        cgroup_skb::CgroupSkbLinkId,
        links::LinkOrder,
        sock_ops::SockOpsLinkId,
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use qos_common::{
    net::{ClassConfig, ClassCounters, ClassState, DirMaps, NetGlobal, PoolState, maps, programs},
    policy::UNIT,
};
use qos_core::probe::{ProgramProbe, load_failure};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::{NetError, ifaces};

/// Direction of traffic through the shaped interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Egress, Direction::Ingress];
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        })
    }
}

/// The class maps of one direction.
pub struct ClassMaps {
    names: DirMaps,
    global: Array<MapData, NetGlobal>,
    pool: Array<MapData, PoolState>,
    class_cfg: Array<MapData, ClassConfig>,
    class_state: Array<MapData, ClassState>,
    class_counters: PerCpuArray<MapData, ClassCounters>,
    cgroup_class: HashMap<MapData, u64, u32>,
}

impl std::fmt::Debug for ClassMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassMaps")
            .field("global", &self.names.global)
            .finish_non_exhaustive()
    }
}

impl ClassMaps {
    fn take(ebpf: &mut Ebpf, names: DirMaps) -> Result<Self, NetError> {
        fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, NetError> {
            let m = ebpf.take_map(name).ok_or(NetError::MissingMap(name))?;
            T::try_from(m).map_err(|source| NetError::Map { map: name, source })
        }
        Ok(Self {
            names,
            global: take(ebpf, names.global)?,
            pool: take(ebpf, names.pool)?,
            class_cfg: take(ebpf, names.class_config)?,
            class_state: take(ebpf, names.class_state)?,
            class_counters: take(ebpf, names.class_counters)?,
            cgroup_class: take(ebpf, names.cgroup_class)?,
        })
    }

    pub fn write_global(&mut self, g: &NetGlobal) -> Result<(), NetError> {
        self.global.set(0, g, 0).map_err(map_err(self.names.global))
    }

    pub fn write_class(&mut self, slot: u32, cfg: &ClassConfig) -> Result<(), NetError> {
        self.class_cfg
            .set(slot, cfg, 0)
            .map_err(map_err(self.names.class_config))
    }

    /// Starts a slot afresh: full buckets, neutral multiplier, zero counters.
    /// Only for slots the datapath does not use (inactive config).
    pub fn reset_state(&mut self, slot: u32, cfg: &ClassConfig) -> Result<(), NetError> {
        let st = ClassState {
            own: cfg.depth as i64,
            borrow: 0,
            ceil: cfg.ceil_depth as i64,
            mult: UNIT,
            ..Default::default()
        };
        self.class_state
            .set(slot, st, 0)
            .map_err(map_err(self.names.class_state))?;
        let cpus = aya::util::nr_cpus().map_err(|(path, source)| NetError::Io {
            path: path.into(),
            source,
        })?;
        let zeros =
            PerCpuValues::try_from(vec![ClassCounters::default(); cpus]).map_err(|source| {
                NetError::Io {
                    path: "per-CPU values".into(),
                    source,
                }
            })?;
        self.class_counters
            .set(slot, zeros, 0)
            .map_err(map_err(self.names.class_counters))
    }

    /// Counters of a slot, summed over the CPUs.
    pub fn read_counters(&self, slot: u32) -> Result<ClassCounters, NetError> {
        let per_cpu = self
            .class_counters
            .get(&slot, 0)
            .map_err(map_err(self.names.class_counters))?;
        let mut sum = ClassCounters::default();
        for c in per_cpu.iter() {
            sum.add(c);
        }
        Ok(sum)
    }

    pub fn read_state(&self, slot: u32) -> Result<ClassState, NetError> {
        self.class_state
            .get(&slot, 0)
            .map_err(map_err(self.names.class_state))
    }

    pub fn read_pool(&self) -> Result<PoolState, NetError> {
        self.pool.get(&0, 0).map_err(map_err(self.names.pool))
    }

    pub fn map_cgroup(&mut self, cgroup_id: u64, slot: u32) -> Result<(), NetError> {
        self.cgroup_class
            .insert(cgroup_id, slot, 0)
            .map_err(map_err(self.names.cgroup_class))
    }

    pub fn unmap_cgroup(&mut self, cgroup_id: u64) -> Result<(), NetError> {
        match self.cgroup_class.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(NetError::Map {
                map: self.names.cgroup_class,
                source,
            }),
        }
    }

    /// Number of entries in the cgroup map (leak checks).
    pub fn cgroup_entries(&self) -> usize {
        self.cgroup_class.keys().count()
    }
}

/// Run-time statistics of one program (needs `kernel.bpf_stats_enabled`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProgramStats {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// The loaded network datapath.
pub struct Datapath {
    ebpf: Ebpf,
    egress_maps: ClassMaps,
    ingress_maps: ClassMaps,
    iface: String,
    ifindex: u32,
    cgroup2_root: PathBuf,
    egress: Option<SchedClassifierLinkId>,
    pacer: Option<SockOpsLinkId>,
    ingress: Option<(SchedClassifierLinkId, CgroupSkbLinkId)>,
    taggers: BTreeMap<u32, (String, SchedClassifierLinkId)>,
    stats_fd: Option<OwnedFd>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("iface", &self.iface)
            .field("ifindex", &self.ifindex)
            .field("taggers", &self.tagged_interfaces())
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> NetError {
    move |source| NetError::Map { map, source }
}

impl Datapath {
    /// Loads the object and attaches the egress program to `iface` and the
    /// pacer to the cgroup2 root. The datapath starts disabled (packets pass
    /// untouched) until [`Datapath::write_global`] enables it.
    pub fn load(iface: &str, cgroup2_root: &Path) -> Result<Self, NetError> {
        let ifindex = ifaces::ifindex(iface)?;
        let mut ebpf = EbpfLoader::new()
            .verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS)
            .load(qos_bpf::NET)
            .map_err(|source| NetError::Load {
                source: Box::new(source),
            })?;
        let egress_maps = ClassMaps::take(&mut ebpf, maps::EGRESS)?;
        let ingress_maps = ClassMaps::take(&mut ebpf, maps::INGRESS)?;
        let mut dp = Self {
            ebpf,
            egress_maps,
            ingress_maps,
            iface: iface.to_owned(),
            ifindex,
            cgroup2_root: cgroup2_root.to_owned(),
            egress: None,
            pacer: None,
            ingress: None,
            taggers: BTreeMap::new(),
            stats_fd: None,
        };
        for name in [programs::EGRESS, programs::TAGGER, programs::INGRESS_TAGGER] {
            let prog: &mut SchedClassifier = program(&mut dp.ebpf, name)?;
            prog.load().map_err(|e| NetError::program(name, e))?;
        }
        let ingress: &mut CgroupSkb = program(&mut dp.ebpf, programs::INGRESS)?;
        ingress
            .load()
            .map_err(|e| NetError::program(programs::INGRESS, e))?;
        let pacer: &mut SockOps = program(&mut dp.ebpf, programs::PACER)?;
        pacer
            .load()
            .map_err(|e| NetError::program(programs::PACER, e))?;

        let egress: &mut SchedClassifier = program(&mut dp.ebpf, programs::EGRESS)?;
        dp.egress = Some(attach_tc(
            egress,
            programs::EGRESS,
            iface,
            TcAttachType::Egress,
        )?);

        let root = open_dir(cgroup2_root)?;
        let pacer: &mut SockOps = program(&mut dp.ebpf, programs::PACER)?;
        // A link attach coexists with other programs on the cgroup
        // (multi-attach is implied for links).
        dp.pacer = Some(
            pacer
                .attach(&root, CgroupAttachMode::Single)
                .map_err(|source| NetError::Attach {
                    program: programs::PACER,
                    target: cgroup2_root.display().to_string(),
                    source: Box::new(source),
                })?,
        );
        debug!(iface, ifindex, root = %cgroup2_root.display(), "network datapath attached");
        Ok(dp)
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The class maps of one direction.
    pub fn maps(&mut self, dir: Direction) -> &mut ClassMaps {
        match dir {
            Direction::Egress => &mut self.egress_maps,
            Direction::Ingress => &mut self.ingress_maps,
        }
    }

    pub fn maps_ref(&self, dir: Direction) -> &ClassMaps {
        match dir {
            Direction::Egress => &self.egress_maps,
            Direction::Ingress => &self.ingress_maps,
        }
    }

    /// Attaches the ingress half: the tag on the shaped interface's tc
    /// ingress and the accounting program on the cgroup2 root (it sees every
    /// socket's received packets, in any network namespace).
    pub fn attach_ingress(&mut self) -> Result<(), NetError> {
        if self.ingress.is_some() {
            return Ok(());
        }
        let iface = self.iface.clone();
        let tagger: &mut SchedClassifier = program(&mut self.ebpf, programs::INGRESS_TAGGER)?;
        let tag_link = attach_tc(
            tagger,
            programs::INGRESS_TAGGER,
            &iface,
            TcAttachType::Ingress,
        )?;
        let root = open_dir(&self.cgroup2_root)?;
        let prog: &mut CgroupSkb = program(&mut self.ebpf, programs::INGRESS)?;
        let attached = prog.attach(
            &root,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single,
        );
        match attached {
            Ok(link) => {
                self.ingress = Some((tag_link, link));
                debug!(iface, "ingress datapath attached");
                Ok(())
            }
            Err(source) => {
                if let Ok(t) = program::<SchedClassifier>(&mut self.ebpf, programs::INGRESS_TAGGER)
                {
                    let _ = t.detach(tag_link);
                }
                Err(NetError::Attach {
                    program: programs::INGRESS,
                    target: self.cgroup2_root.display().to_string(),
                    source: Box::new(source),
                })
            }
        }
    }

    /// Attaches the tagger to a container-facing interface (tc ingress).
    pub fn attach_tagger(&mut self, ifname: &str) -> Result<(), NetError> {
        let ifindex = ifaces::ifindex(ifname)?;
        if self.taggers.contains_key(&ifindex) {
            return Ok(());
        }
        let prog: &mut SchedClassifier = program(&mut self.ebpf, programs::TAGGER)?;
        let link = attach_tc(prog, programs::TAGGER, ifname, TcAttachType::Ingress)?;
        self.taggers.insert(ifindex, (ifname.to_owned(), link));
        debug!(ifname, ifindex, "tagger attached");
        Ok(())
    }

    /// Forgets taggers whose interface is gone (the kernel dropped the link
    /// with the device) and detaches those not in `keep`.
    pub fn prune_taggers(&mut self, keep: &BTreeMap<u32, String>) {
        let stale: Vec<u32> = self
            .taggers
            .keys()
            .copied()
            .filter(|ifindex| !keep.contains_key(ifindex))
            .collect();
        for ifindex in stale {
            if let Some((name, link)) = self.taggers.remove(&ifindex) {
                if let Ok(prog) = program::<SchedClassifier>(&mut self.ebpf, programs::TAGGER) {
                    // Fails harmlessly when the device (and link) is gone.
                    let _ = prog.detach(link);
                }
                debug!(ifname = name, ifindex, "tagger removed");
            }
        }
    }

    pub fn tagged_interfaces(&self) -> Vec<String> {
        self.taggers.values().map(|(n, _)| n.clone()).collect()
    }

    /// Turns on the kernel's per-program run-time accounting for as long as
    /// the datapath lives.
    pub fn enable_run_time_stats(&mut self) -> Result<(), NetError> {
        if self.stats_fd.is_none() {
            let fd =
                aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| NetError::Io {
                    path: PathBuf::from("BPF_ENABLE_STATS"),
                    source: e.io_error,
                })?;
            self.stats_fd = Some(fd);
        }
        Ok(())
    }

    /// Kernel ids of the loaded programs.
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        ALL_PROGRAMS
            .into_iter()
            .filter_map(|n| {
                self.ebpf
                    .program(n)
                    .and_then(|p| p.info().ok())
                    .map(|i| (n, i.id()))
            })
            .collect()
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let mut out = Vec::new();
        for name in ALL_PROGRAMS {
            let Some(p) = self.ebpf.program(name) else {
                continue;
            };
            match p.info() {
                Ok(info) => out.push(ProgramStats {
                    name: name.to_owned(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                }),
                Err(e) => warn!(program = name, error = %e, "reading program info"),
            }
        }
        out
    }

    /// Detaches everything. Dropping the datapath does the same; this makes
    /// the order explicit (egress first, so no packet sees a half state).
    pub fn detach(mut self) {
        if let Some(link) = self.egress.take()
            && let Ok(prog) = program::<SchedClassifier>(&mut self.ebpf, programs::EGRESS)
        {
            let _ = prog.detach(link);
        }
        if let Some((tag, link)) = self.ingress.take() {
            if let Ok(prog) = program::<CgroupSkb>(&mut self.ebpf, programs::INGRESS) {
                let _ = prog.detach(link);
            }
            if let Ok(prog) = program::<SchedClassifier>(&mut self.ebpf, programs::INGRESS_TAGGER) {
                let _ = prog.detach(tag);
            }
        }
        let keep = BTreeMap::new();
        self.prune_taggers(&keep);
        if let Some(link) = self.pacer.take()
            && let Ok(prog) = program::<SockOps>(&mut self.ebpf, programs::PACER)
        {
            let _ = prog.detach(link);
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, NetError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or(NetError::MissingProgram(name))?;
    p.try_into().map_err(|e| NetError::program(name, e))
}

const ALL_PROGRAMS: [&str; 5] = [
    programs::EGRESS,
    programs::TAGGER,
    programs::PACER,
    programs::INGRESS_TAGGER,
    programs::INGRESS,
];

fn open_dir(path: &Path) -> Result<File, NetError> {
    File::open(path).map_err(|source| NetError::Io {
        path: path.into(),
        source,
    })
}

/// How tc programs attach on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcAttachMode {
    /// tcx links (6.6 and later): owned by the process, no qdisc.
    Tcx,
    /// cls_bpf filters under a clsact qdisc, set up over netlink.
    NetlinkClsact,
}

impl std::fmt::Display for TcAttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx links",
            Self::NetlinkClsact => "cls_bpf under clsact (netlink)",
        })
    }
}

/// The attach mode the datapath uses on the running kernel.
pub fn tc_attach_mode() -> TcAttachMode {
    let tcx = aya::util::KernelVersion::current()
        .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
        .unwrap_or(false);
    if tcx {
        TcAttachMode::Tcx
    } else {
        TcAttachMode::NetlinkClsact
    }
}

/// Loads every program of the network object into the running kernel
/// without attaching any: which ones the verifier accepts, and why not.
pub fn probe_programs() -> Vec<ProgramProbe> {
    let kinds = [
        (programs::EGRESS, "tc egress (shaped interface)"),
        (programs::TAGGER, "tc ingress (container veth tagger)"),
        (programs::INGRESS_TAGGER, "tc ingress (shaped interface)"),
        (programs::INGRESS, "cgroup_skb ingress (cgroup2 root)"),
        (programs::PACER, "sock_ops (cgroup2 root)"),
    ];
    let probe = |program: &str, kind: &str, error: Option<String>| ProgramProbe {
        object: "qos-net",
        program: program.to_owned(),
        kind: kind.to_owned(),
        loaded: error.is_none(),
        error,
    };
    let mut ebpf = match EbpfLoader::new().load(qos_bpf::NET) {
        Ok(e) => e,
        Err(e) => {
            return kinds
                .iter()
                .map(|(p, k)| probe(p, k, Some(format!("loading the object: {e}"))))
                .collect();
        }
    };
    kinds
        .iter()
        .map(|&(name, kind)| {
            let result = match ebpf.program_mut(name) {
                None => Err("not in the object".to_owned()),
                Some(aya::programs::Program::SchedClassifier(p)) => p.load().map_err(load_error),
                Some(aya::programs::Program::CgroupSkb(p)) => p.load().map_err(load_error),
                Some(aya::programs::Program::SockOps(p)) => p.load().map_err(load_error),
                Some(other) => Err(format!("unexpected program type {:?}", other.prog_type())),
            };
            probe(name, kind, result.err())
        })
        .collect()
}

fn load_error(e: aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => load_failure(&io_error, &verifier_log.to_string()),
        other => other.to_string(),
    }
}

fn attach_tc(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    kind: TcAttachType,
) -> Result<SchedClassifierLinkId, NetError> {
    let options = if tc_attach_mode() == TcAttachMode::Tcx {
        TcAttachOptions::TcxOrder(LinkOrder::default())
    } else {
        // Pre-6.6 kernels: netlink cls_bpf under a clsact qdisc.
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
        TcAttachOptions::Netlink(Default::default())
    };
    prog.attach_with_options(iface, kind, options)
        .map_err(|source| NetError::Attach {
            program: name,
            target: iface.to_owned(),
            source: Box::new(source),
        })
}
