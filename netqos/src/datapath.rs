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
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
    },
};
use qos_common::{
    net::{ClassConfig, ClassCounters, ClassState, DirMaps, NetGlobal, PoolState, maps, programs},
    policy::UNIT,
};
use qos_core::{
    pin::{Generation, TcFilterRecord},
    probe::{ProgramProbe, load_failure},
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    NetError, ifaces,
    qdisc::{self, AckQdisc},
};

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

    pub fn read_global(&self) -> Result<NetGlobal, NetError> {
        self.global.get(&0, 0).map_err(map_err(self.names.global))
    }

    pub fn write_global(&mut self, g: &NetGlobal) -> Result<(), NetError> {
        self.global.set(0, g, 0).map_err(map_err(self.names.global))
    }

    pub fn write_class(&mut self, slot: u32, cfg: &ClassConfig) -> Result<(), NetError> {
        self.class_cfg
            .set(slot, cfg, 0)
            .map_err(map_err(self.names.class_config))
    }

    pub fn read_class(&self, slot: u32) -> Result<ClassConfig, NetError> {
        self.class_cfg
            .get(&slot, 0)
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

    /// Every cgroup id → slot entry (what an earlier daemon left).
    pub fn cgroup_slots(&self) -> Vec<(u64, u32)> {
        self.cgroup_class.iter().filter_map(Result::ok).collect()
    }
}

/// A program attached by us, with its pin (bpf link) or record (netlink tc
/// filter) when the datapath outlives the daemon.
#[derive(Debug)]
struct Attachment {
    link: AttachedLink,
    pin: Option<PathBuf>,
}

#[derive(Debug)]
enum AttachedLink {
    /// tcx and cgroup links: closing the last reference (fd or pin)
    /// detaches.
    Fd(FdLink),
    /// A cls_bpf filter (netlink); dropping the link detaches it.
    Tc(SchedClassifierLink),
}

impl Attachment {
    /// Leaves the program attached when it is pinned (or recorded); detaches
    /// it otherwise.
    fn keep(self) {
        match (self.link, self.pin) {
            // The filter lives on in the kernel; the record finds it again.
            (AttachedLink::Tc(link), Some(_)) => std::mem::forget(link),
            // A pinned fd link lives on through its pin.
            (link, _) => drop(link),
        }
    }

    /// Detaches the program and removes its pin or record.
    fn remove(self) {
        if let Some(pin) = &self.pin {
            let removed = if pin.is_dir() {
                std::fs::remove_dir(pin)
            } else {
                std::fs::remove_file(pin)
            };
            if let Err(e) = removed
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(pin = %pin.display(), error = %e, "removing a pin");
            }
        }
        drop(self.link);
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
    /// Where maps and links are pinned; `None`: everything goes with us.
    generation: Option<Generation>,
    /// The maps were pinned by an earlier daemon of the same build.
    adopted: bool,
    egress: Option<Attachment>,
    pacer: Option<Attachment>,
    ingress: Option<(Attachment, Attachment)>,
    taggers: BTreeMap<u32, (String, Attachment)>,
    stats_fd: Option<OwnedFd>,
    /// Ingress ACK pacing: fq (ours) is at the shaped interface's root;
    /// its record in the generation, when pinned.
    ack_qdisc: Option<Option<PathBuf>>,
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
    /// pacer to the cgroup2 root; everything is detached when the datapath
    /// goes. A fresh datapath starts disabled (packets pass untouched) until
    /// [`ClassMaps::write_global`] enables it.
    pub fn load(iface: &str, cgroup2_root: &Path) -> Result<Self, NetError> {
        Self::open(iface, cgroup2_root, None)
    }

    /// As [`Datapath::load`], with maps and links pinned under `pin_root`
    /// (bpffs) so that they outlive the daemon. What an earlier daemon of
    /// the same build pinned there is adopted: its maps (quotas, token
    /// buckets, counters) and its attachments, which never stopped working.
    /// The generation of another build is replaced after this one is
    /// attached ([`Datapath::retire_other_generations`]).
    pub fn open(
        iface: &str,
        cgroup2_root: &Path,
        pin_root: Option<&Path>,
    ) -> Result<Self, NetError> {
        let ifindex = ifaces::ifindex(iface)?;
        let generation = pin_root.map(|root| Generation::of(root, "net", qos_bpf::NET));
        let adopted = generation.as_ref().is_some_and(Generation::exists);
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS);
        if let Some(g) = &generation {
            g.create().map_err(|e| NetError::Pin(e.to_string()))?;
            for dir in [maps::EGRESS, maps::INGRESS] {
                for name in dir.all() {
                    loader.map_pin_path(name, g.map(name));
                }
            }
            loader.map_pin_path(maps::SYN_CLASS, g.map(maps::SYN_CLASS));
        }
        let mut ebpf = loader.load(qos_bpf::NET).map_err(|source| NetError::Load {
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
            generation,
            adopted,
            egress: None,
            pacer: None,
            ingress: None,
            ack_qdisc: None,
            taggers: BTreeMap::new(),
            stats_fd: None,
        };
        if adopted {
            info!(
                iface,
                "adopting the pinned network datapath of an earlier qosd"
            );
        }
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

        dp.egress = Some(dp.attach_tc_kept(
            programs::EGRESS,
            "egress",
            iface,
            ifindex,
            TcAttachType::Egress,
        )?);
        dp.pacer = Some(dp.attach_cgroup_kept(programs::PACER, "pacer")?);
        debug!(iface, ifindex, root = %cgroup2_root.display(), "network datapath attached");
        Ok(dp)
    }

    /// Whether the maps were adopted from an earlier daemon.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pinned link or recorded filter `what` of this generation, if an
    /// earlier daemon left one that can still be used.
    fn pinned(&self, what: &str, iface: &str, kind: TcAttachType) -> Option<Attachment> {
        let g = self.generation.as_ref()?;
        let pin = g.link(what);
        if pin.exists() {
            return match PinnedLink::from_pin(&pin) {
                Ok(l) => Some(Attachment {
                    link: AttachedLink::Fd(l.into()),
                    pin: Some(pin),
                }),
                Err(e) => {
                    warn!(pin = %pin.display(), error = %e, "unusable pinned link; attaching afresh");
                    let _ = std::fs::remove_file(&pin);
                    None
                }
            };
        }
        let (kind_what, ifindex) = what.rsplit_once(':')?;
        let ifindex: u32 = ifindex.parse().ok()?;
        let rec = g
            .tc_filters()
            .into_iter()
            .find(|r| r.what == kind_what && r.ifindex == ifindex)?;
        let record = g.tc_dir().join(rec.file_name());
        match SchedClassifierLink::attached(
            iface,
            kind,
            rec.priority,
            TcHandle::from(rec.handle),
            None,
        ) {
            Ok(link) => Some(Attachment {
                link: AttachedLink::Tc(link),
                pin: Some(record),
            }),
            Err(e) => {
                warn!(record = %record.display(), error = %e, "stale tc filter record");
                let _ = std::fs::remove_dir(&record);
                None
            }
        }
    }

    /// Attaches a tc program to `iface` (or adopts the earlier daemon's
    /// attachment), pinned when the datapath is.
    fn attach_tc_kept(
        &mut self,
        name: &'static str,
        what: &str,
        iface: &str,
        ifindex: u32,
        kind: TcAttachType,
    ) -> Result<Attachment, NetError> {
        let pin_name = format!("{what}:{ifindex}");
        if let Some(a) = self.pinned(&pin_name, iface, kind) {
            debug!(what = pin_name, "adopted");
            return Ok(a);
        }
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let id = attach_tc(prog, name, iface, kind)?;
        let link = prog.take_link(id).map_err(|e| NetError::program(name, e))?;
        let Some(g) = &self.generation else {
            return Ok(Attachment {
                link: AttachedLink::Tc(link),
                pin: None,
            });
        };
        let pin_err = |e: String| NetError::Pin(format!("{name} on {iface}: {e}"));
        if tc_attach_mode() == TcAttachMode::Tcx {
            let fd = FdLink::try_from(link).map_err(|e| pin_err(e.to_string()))?;
            let pin = g.link(&pin_name);
            let pinned = fd.pin(&pin).map_err(|e| pin_err(e.to_string()))?;
            Ok(Attachment {
                link: AttachedLink::Fd(pinned.into()),
                pin: Some(pin),
            })
        } else {
            let rec = TcFilterRecord {
                what: what.to_owned(),
                ifindex,
                priority: link.priority().map_err(|e| pin_err(e.to_string()))?,
                handle: link.handle().map_err(|e| pin_err(e.to_string()))?.into(),
            };
            let record = g
                .record_tc_filter(&rec)
                .map_err(|e| pin_err(e.to_string()))?;
            Ok(Attachment {
                link: AttachedLink::Tc(link),
                pin: Some(record),
            })
        }
    }

    /// Attaches a program to the cgroup2 root (or adopts the earlier
    /// daemon's link), pinned when the datapath is. A link attach coexists
    /// with other programs on the cgroup (multi-attach is implied).
    fn attach_cgroup_kept(
        &mut self,
        name: &'static str,
        what: &str,
    ) -> Result<Attachment, NetError> {
        if let Some(a) = self.pinned(what, &self.iface.clone(), TcAttachType::Egress) {
            debug!(what, "adopted");
            return Ok(a);
        }
        let root = open_dir(&self.cgroup2_root)?;
        let attach_err = |source| NetError::Attach {
            program: name,
            target: self.cgroup2_root.display().to_string(),
            source: Box::new(source),
        };
        let fd: FdLink = if name == programs::PACER {
            let prog: &mut SockOps = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(&root, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(|e| NetError::program(name, e))?;
            FdLink::try_from(link).map_err(|e| NetError::Pin(format!("{name}: {e}")))?
        } else {
            let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(
                    &root,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(|e| NetError::program(name, e))?;
            FdLink::try_from(link).map_err(|e| NetError::Pin(format!("{name}: {e}")))?
        };
        let Some(g) = &self.generation else {
            return Ok(Attachment {
                link: AttachedLink::Fd(fd),
                pin: None,
            });
        };
        let pin = g.link(what);
        let pinned = fd
            .pin(&pin)
            .map_err(|e| NetError::Pin(format!("{name}: {e}")))?;
        Ok(Attachment {
            link: AttachedLink::Fd(pinned.into()),
            pin: Some(pin),
        })
    }

    /// Pins and records of this generation that no attachment of this
    /// datapath claims (an interface that went, ingress turned off): they
    /// are detached and removed. Call once the datapath is complete.
    pub fn drop_unclaimed(&mut self) {
        let Some(g) = self.generation.clone() else {
            return;
        };
        let claimed: Vec<&Path> = self
            .egress
            .iter()
            .chain(self.pacer.iter())
            .chain(self.ingress.iter().flat_map(|(a, b)| [a, b]))
            .chain(self.taggers.values().map(|(_, a)| a))
            .filter_map(|a| a.pin.as_deref())
            .chain(self.ack_qdisc.iter().flatten().map(PathBuf::as_path))
            .collect();
        for name in g.pinned_links() {
            let pin = g.link(&name);
            if !claimed.contains(&pin.as_path()) {
                info!(pin = %pin.display(), "removing an unclaimed pinned link");
                let _ = std::fs::remove_file(&pin);
            }
        }
        for rec in g.tc_filters() {
            let record = g.tc_dir().join(rec.file_name());
            if claimed.contains(&record.as_path()) {
                continue;
            }
            info!(record = %record.display(), "removing an unclaimed tc record");
            detach_recorded(&rec, true);
            let _ = std::fs::remove_dir(&record);
        }
    }

    /// Removes the pinned datapaths of other builds (after this one is
    /// attached, so that traffic is never without one): detaches their
    /// programs and unpins their maps.
    pub fn retire_other_generations(&self) {
        let Some(g) = &self.generation else { return };
        for old in g.others() {
            info!(dir = %old.dir().display(), "replacing the pinned datapath of another qosd build");
            // The fq qdisc is shared by every build (known by its handle):
            // it stays when this datapath uses it, goes when it does not.
            retire(&old, self.ack_qdisc.is_none());
        }
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
        let tag = self.attach_tc_kept(
            programs::INGRESS_TAGGER,
            "ingress-tag",
            &iface,
            self.ifindex,
            TcAttachType::Ingress,
        )?;
        match self.attach_cgroup_kept(programs::INGRESS, "ingress") {
            Ok(acct) => {
                self.ingress = Some((tag, acct));
                debug!(iface, "ingress datapath attached");
                Ok(())
            }
            Err(e) => {
                tag.remove();
                Err(e)
            }
        }
    }

    /// Puts fq (ours) at the root of the shaped interface, where the ACK
    /// departure times the datapath sets are honoured (ingress ACK pacing),
    /// and records it so that `qosd --cleanup` removes it. Called again
    /// after the interface was re-created.
    pub fn ensure_ack_qdisc(&mut self) -> AckQdisc {
        let state = qdisc::ensure_fq(&self.iface);
        if state.is_ready() {
            let record = self.generation.as_ref().and_then(|g| {
                g.record_tc_filter(&TcFilterRecord {
                    what: FQ_RECORD.into(),
                    ifindex: self.ifindex,
                    priority: 0,
                    handle: 0,
                })
                .map_err(|e| warn!(error = %e, "recording the fq qdisc"))
                .ok()
            });
            // A record of the interface's earlier ifindex is unclaimed now.
            self.ack_qdisc = Some(record);
        }
        state
    }

    /// Follows the shaped interface when it was deleted and created again
    /// (a new ifindex; its old attachments went with the old device):
    /// attaches egress (and the ingress tag) to the new one. `Ok(None)`:
    /// nothing to do; `Ok(Some(ifindex))`: re-attached there;
    /// [`NetError::NoInterface`]: it is gone (for now).
    pub fn follow_interface(&mut self) -> Result<Option<u32>, NetError> {
        let now = ifaces::ifindex(&self.iface)?;
        if now == self.ifindex {
            return Ok(None);
        }
        let iface = self.iface.clone();
        // Attach to the new device first; the ifindex moves on only when all
        // of it is attached, so a failure is retried at the next check.
        let egress = self.attach_tc_kept(
            programs::EGRESS,
            "egress",
            &iface,
            now,
            TcAttachType::Egress,
        )?;
        let tag = match &self.ingress {
            Some(_) => match self.attach_tc_kept(
                programs::INGRESS_TAGGER,
                "ingress-tag",
                &iface,
                now,
                TcAttachType::Ingress,
            ) {
                Ok(t) => Some(t),
                Err(e) => {
                    egress.remove();
                    return Err(e);
                }
            },
            None => None,
        };
        // The old attachments went with the old device; their pins go now.
        if let Some(old) = self.egress.replace(egress) {
            old.remove();
        }
        if let (Some(tag), Some((old_tag, _))) = (tag, self.ingress.as_mut()) {
            std::mem::replace(old_tag, tag).remove();
        }
        self.ifindex = now;
        info!(
            iface,
            ifindex = now,
            "shaped interface re-created; datapath attached again"
        );
        Ok(Some(now))
    }

    /// Attaches the tagger to a container-facing interface (tc ingress).
    pub fn attach_tagger(&mut self, ifname: &str) -> Result<(), NetError> {
        let ifindex = ifaces::ifindex(ifname)?;
        if self.taggers.contains_key(&ifindex) {
            return Ok(());
        }
        let link = self.attach_tc_kept(
            programs::TAGGER,
            "tag",
            ifname,
            ifindex,
            TcAttachType::Ingress,
        )?;
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
                // Detaching fails harmlessly when the device (and link) is
                // gone.
                link.remove();
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

    /// The program instance that is attached for `name`, when it is a
    /// bpf link: after an adoption, the earlier daemon's instance.
    fn attached_program_id(&self, name: &str) -> Option<u32> {
        let a = match name {
            programs::EGRESS => self.egress.as_ref(),
            programs::PACER => self.pacer.as_ref(),
            programs::INGRESS_TAGGER => self.ingress.as_ref().map(|(t, _)| t),
            programs::INGRESS => self.ingress.as_ref().map(|(_, a)| a),
            _ => self.taggers.values().next().map(|(_, a)| a),
        }?;
        match &a.link {
            AttachedLink::Fd(l) => l.info().ok().map(|i| i.program_id()),
            AttachedLink::Tc(_) => None,
        }
    }

    /// Run counts and times of the attached programs (the earlier daemon's
    /// instances after an adoption; the loaded ones otherwise).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let mut out = Vec::new();
        for name in ALL_PROGRAMS {
            let Some(p) = self.ebpf.program(name) else {
                continue;
            };
            let attached = self.attached_program_id(name).and_then(|id| {
                aya::programs::loaded_programs()
                    .filter_map(Result::ok)
                    .find(|i| i.id() == id)
            });
            match attached.map_or_else(|| p.info(), Ok) {
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

    /// Detaches everything and removes its pins (the whole generation
    /// when pinned). Dropping an unpinned datapath does the same; this makes
    /// the order explicit (egress first, so no packet sees a half state).
    pub fn detach(mut self) {
        self.detach_all();
    }

    fn detach_all(&mut self) {
        if let Some(a) = self.egress.take() {
            a.remove();
        }
        if let Some(record) = self.ack_qdisc.take() {
            qdisc::remove_ours(&self.iface);
            if let Some(r) = record {
                let _ = std::fs::remove_dir(r);
            }
        }
        if let Some((tag, acct)) = self.ingress.take() {
            acct.remove();
            tag.remove();
        }
        let keep = BTreeMap::new();
        self.prune_taggers(&keep);
        if let Some(a) = self.pacer.take() {
            a.remove();
        }
        if let Some(g) = self.generation.take()
            && let Err(e) = g.remove()
        {
            warn!(error = %e, "removing the pinned datapath");
        }
    }

    /// Leaves the datapath working in the kernel for the next daemon: pinned
    /// links and maps stay, recorded tc filters stay. An unpinned datapath
    /// is detached.
    pub fn keep(mut self) {
        self.keep_all();
    }

    fn keep_all(&mut self) {
        if self.generation.is_none() {
            self.detach_all();
            return;
        }
        if self.egress.is_none() && self.pacer.is_none() && self.ingress.is_none() {
            return;
        }
        for a in [self.egress.take(), self.pacer.take()]
            .into_iter()
            .flatten()
        {
            a.keep();
        }
        if let Some((tag, acct)) = self.ingress.take() {
            tag.keep();
            acct.keep();
        }
        for (_, (_, a)) in std::mem::take(&mut self.taggers) {
            a.keep();
        }
        info!(iface = %self.iface, "network datapath left attached for the next qosd");
    }
}

/// A pinned datapath dropped without [`Datapath::detach`] stays (as after a
/// crash); an unpinned one is detached.
impl Drop for Datapath {
    fn drop(&mut self) {
        self.keep_all();
    }
}

/// Record name of the fq qdisc installed for ACK pacing.
const FQ_RECORD: &str = "fq";

/// Detaches the tc filter of a record (netlink; the device may be gone),
/// or removes the fq qdisc of a record when `qdisc`.
fn detach_recorded(rec: &TcFilterRecord, qdisc: bool) {
    let Some(name) = ifaces::name_of(rec.ifindex) else {
        return;
    };
    if rec.what == FQ_RECORD {
        if qdisc {
            qdisc::remove_ours(&name);
        }
        return;
    }
    let kind = if rec.what == "egress" {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    };
    if let Ok(link) =
        SchedClassifierLink::attached(&name, kind, rec.priority, rec.handle.into(), None)
    {
        drop(link);
    }
}

/// Detaches and unpins a whole generation (another build's, or ours on
/// cleanup); `qdisc`: also the fq qdisc it recorded (cleanup).
pub fn retire(g: &Generation, qdisc: bool) {
    for rec in g.tc_filters() {
        detach_recorded(&rec, qdisc);
    }
    if let Err(e) = g.remove() {
        warn!(error = %e, "removing a pinned datapath");
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

/// A pinned network datapath seen from outside, without loading anything:
/// what survives the daemon (tests, fault reports).
#[derive(Debug)]
pub struct PinnedNet {
    generation: Generation,
}

/// A pinned link: its pin name and the kernel's ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PinnedLinkInfo {
    pub name: String,
    pub link_id: u32,
    pub program_id: u32,
}

impl PinnedNet {
    /// This build's generation under `root`, if one is pinned there.
    pub fn find(root: &Path) -> Option<Self> {
        let generation = Generation::of(root, "net", qos_bpf::NET);
        generation.exists().then_some(Self { generation })
    }

    pub fn dir(&self) -> &Path {
        self.generation.dir()
    }

    /// The pinned links that still resolve.
    pub fn links(&self) -> Vec<PinnedLinkInfo> {
        self.generation
            .pinned_links()
            .into_iter()
            .filter_map(|name| {
                let link = FdLink::from(PinnedLink::from_pin(self.generation.link(&name)).ok()?);
                let info = link.info().ok()?;
                Some(PinnedLinkInfo {
                    name,
                    link_id: info.id(),
                    program_id: info.program_id(),
                })
            })
            .collect()
    }

    /// Recorded netlink tc filters (pre-6.6 kernels).
    pub fn tc_filters(&self) -> Vec<TcFilterRecord> {
        self.generation.tc_filters()
    }

    fn map<T>(&self, name: &'static str) -> Result<T, NetError>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let data = MapData::from_pin(self.generation.map(name)).map_err(map_err(name))?;
        // The variant only selects the conversion; the map type is checked.
        let map = match name {
            n if n.ends_with("CGROUP_CLASS") => aya::maps::Map::HashMap(data),
            _ => aya::maps::Map::Array(data),
        };
        T::try_from(map).map_err(map_err(name))
    }

    /// The slot a cgroup's traffic is classified into, if any.
    pub fn cgroup_slot(&self, dir: Direction, cgroup_id: u64) -> Result<Option<u32>, NetError> {
        let names = dir_maps(dir);
        let m: HashMap<MapData, u64, u32> = self.map(names.cgroup_class)?;
        match m.get(&cgroup_id, 0) {
            Ok(slot) => Ok(Some(slot)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(NetError::Map {
                map: names.cgroup_class,
                source,
            }),
        }
    }

    /// The datapath parameters of a slot.
    pub fn class_config(&self, dir: Direction, slot: u32) -> Result<ClassConfig, NetError> {
        let names = dir_maps(dir);
        let m: Array<MapData, ClassConfig> = self.map(names.class_config)?;
        m.get(&slot, 0).map_err(map_err(names.class_config))
    }
}

fn dir_maps(dir: Direction) -> DirMaps {
    match dir {
        Direction::Egress => maps::EGRESS,
        Direction::Ingress => maps::INGRESS,
    }
}

/// Whether a bpf link with this id exists in the kernel.
pub fn link_exists(link_id: u32) -> bool {
    aya::programs::loaded_links().any(|l| l.is_ok_and(|l| l.id() == link_id))
}
