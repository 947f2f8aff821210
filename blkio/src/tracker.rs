//! Loads the writeback attribution tracker and reads what it counted.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        BtfTracePoint,
        links::{FdLink, PinnedLink},
    },
};
use qos_common::io::{
    DEVICE_ENTRIES, DeviceCounters, INODE_ENTRIES, InodeInfo, InodeKey, IoCounters, IoOffsets,
    NR_PAGES_IS_ORDER, OFFSETS_READY, RANGE_ENTRIES, RangeInfo, RangeKey, STATS_ENTRIES, StatsKey,
};
use serde::{Deserialize, Serialize};

use crate::{BlkioError, btf::Btf};
use qos_core::{
    pin::Generation,
    probe::{ProgramProbe, load_failure},
};

/// Program name and the kernel tracepoint it attaches to.
pub const PROGRAMS: [(&str, &str); 2] = [
    ("qos_io_dirty", "writeback_dirty_folio"),
    ("qos_io_bio", "block_bio_queue"),
];

pub use qos_core::probe::kernel_release;

/// Loads both programs into the running kernel without attaching them, after
/// resolving the kernel struct offsets they need from its BTF: which ones the
/// kernel accepts, and why not.
pub fn probe_programs() -> Vec<ProgramProbe> {
    let all_failed = |why: String| {
        PROGRAMS
            .iter()
            .map(|(name, tp)| ProgramProbe {
                object: "qos-io",
                program: (*name).to_owned(),
                kind: format!("tp_btf/{tp}"),
                loaded: false,
                error: Some(why.clone()),
            })
            .collect()
    };
    let offsets = Btf::from_kernel()
        .map_err(BlkioError::from)
        .and_then(|btf| resolve_offsets(&btf));
    if let Err(e) = offsets {
        return all_failed(format!("kernel struct offsets from BTF: {e}"));
    }
    let kernel_btf = match aya::Btf::from_sys_fs() {
        Ok(b) => b,
        Err(e) => return all_failed(format!("reading /sys/kernel/btf/vmlinux: {e}")),
    };
    let mut ebpf = match EbpfLoader::new().load(qos_bpf::IO) {
        Ok(e) => e,
        Err(e) => return all_failed(format!("loading the object: {e}")),
    };
    PROGRAMS
        .iter()
        .map(|&(name, tracepoint)| {
            let error = match ebpf.program_mut(name) {
                Some(aya::programs::Program::BtfTracePoint(p)) => {
                    p.load(tracepoint, &kernel_btf).err().map(|e| match e {
                        aya::programs::ProgramError::LoadError {
                            io_error,
                            verifier_log,
                        } => load_failure(&io_error, &verifier_log.to_string()),
                        other => other.to_string(),
                    })
                }
                Some(_) => Some("not a tp_btf program".to_owned()),
                None => Some("not in the object".to_owned()),
            };
            ProgramProbe {
                object: "qos-io",
                program: name.to_owned(),
                kind: format!("tp_btf/{tracepoint}"),
                loaded: error.is_none(),
                error,
            }
        })
        .collect()
}

/// Offsets of every field the programs read, from `btf`.
pub fn resolve_offsets(btf: &Btf) -> Result<IoOffsets, BlkioError> {
    let m = |s: &str, f: &str| btf.member_offset(s, f);
    let (folio_nr_pages, order) = if btf.has_member("folio", "_nr_pages") {
        (m("folio", "_nr_pages")?, false)
    } else if btf.has_member("folio", "_folio_nr_pages") {
        (m("folio", "_folio_nr_pages")?, false)
    } else {
        (m("folio", "_folio_order")?, true)
    };
    let small = |v: i64, what: &str| {
        u32::try_from(v).map_err(|_| BlkioError::Tracker {
            kernel: kernel_release(),
            reason: format!("{what} = {v} is out of range"),
        })
    };
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(IoOffsets {
        flags: OFFSETS_READY | if order { NR_PAGES_IS_ORDER } else { 0 },
        io_subsys_index: small(btf.enum_value("io_cgrp_id")?, "io_cgrp_id")?,
        page_size: small(page_size as i64, "page size")?,
        pg_head_bit: small(btf.enum_value("PG_head")?, "PG_head")?,
        task_cgroups: m("task_struct", "cgroups")?,
        css_set_subsys: m("css_set", "subsys")?,
        css_cgroup: m("cgroup_subsys_state", "cgroup")?,
        cgroup_kn: m("cgroup", "kn")?,
        kn_id: m("kernfs_node", "id")?,
        folio_flags: m("folio", "flags")?,
        folio_nr_pages,
        page_mapping: m("folio", "mapping")?,
        page_index: m("folio", "index")?,
        mapping_host: m("address_space", "host")?,
        inode_ino: m("inode", "i_ino")?,
        inode_sb: m("inode", "i_sb")?,
        inode_generation: m("inode", "i_generation")?,
        sb_dev: m("super_block", "s_dev")?,
        bio_opf: m("bio", "bi_opf")?,
        bio_bdev: m("bio", "bi_bdev")?,
        bdev_dev: m("block_device", "bd_dev")?,
        bio_size: m("bio", "bi_iter.bi_size")?,
        bio_io_vec: m("bio", "bi_io_vec")?,
        bvec_page: m("bio_vec", "bv_page")?,
        bio_blkg: m("bio", "bi_blkg")?,
        blkg_blkcg: m("blkcg_gq", "blkcg")?,
        blkcg_css: m("blkcg", "css")?,
        page_compound_head: m("page", "compound_head")?,
        page_struct_size: btf.struct_size("page")?,
    })
}

/// Memory the tracker's maps may take at most (keys + values, without the
/// kernel's per-entry overhead), bytes.
pub const fn map_memory_bytes() -> u64 {
    use core::mem::size_of;
    (STATS_ENTRIES as usize * (size_of::<StatsKey>() + size_of::<IoCounters>())
        + DEVICE_ENTRIES as usize * (4 + size_of::<DeviceCounters>())
        + INODE_ENTRIES as usize * (size_of::<InodeKey>() + size_of::<InodeInfo>())
        + RANGE_ENTRIES as usize * (size_of::<RangeKey>() + size_of::<RangeInfo>())) as u64
}

/// Run count and time of one program (bpf_stats must be enabled to count).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgramCost {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Every map of the object (pinned by name when the tracker is).
const MAPS: [&str; 5] = [
    "IO_OFFSETS",
    "IO_STATS",
    "IO_DEVICES",
    "IO_INODES",
    "IO_RANGES",
];

pub struct Tracker {
    ebpf: Ebpf,
    kernel: String,
    /// Where maps and links are pinned; `None`: they go with the tracker.
    generation: Option<Generation>,
    /// The attached programs' links (with their pins).
    links: Vec<(FdLink, Option<PathBuf>)>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

fn tracker_err(reason: impl std::fmt::Display) -> BlkioError {
    BlkioError::Tracker {
        kernel: kernel_release(),
        reason: reason.to_string(),
    }
}

impl Tracker {
    /// Loads and attaches both programs. A failure names the program, the
    /// kernel and, for a rejected program, the verifier's log. Everything
    /// goes with the tracker.
    pub fn load() -> Result<Self, BlkioError> {
        Self::open(None)
    }

    /// As [`Tracker::load`], with maps and links pinned under `pin_root`
    /// (bpffs) so that counting goes on while the daemon restarts; what an
    /// earlier daemon of the same build pinned there is adopted (its
    /// counters continue), other builds' trackers are replaced.
    pub fn open(pin_root: Option<&Path>) -> Result<Self, BlkioError> {
        let kernel = kernel_release();
        let btf = Btf::from_kernel()?;
        let offsets = resolve_offsets(&btf)?;
        let kernel_btf = aya::Btf::from_sys_fs().map_err(tracker_err)?;
        let generation = pin_root.map(|root| Generation::of(root, "io", qos_bpf::IO));
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS);
        if let Some(g) = &generation {
            g.create().map_err(tracker_err)?;
            for name in MAPS {
                loader.map_pin_path(name, g.map(name));
            }
        }
        let mut ebpf = loader
            .load(qos_bpf::IO)
            .map_err(|e| tracker_err(format!("loading the object: {e}")))?;
        {
            let map = ebpf
                .map_mut("IO_OFFSETS")
                .ok_or_else(|| tracker_err("object has no IO_OFFSETS map"))?;
            let mut arr = aya::maps::Array::<_, IoOffsets>::try_from(map).map_err(tracker_err)?;
            arr.set(0, offsets, 0).map_err(tracker_err)?;
        }
        let mut links = Vec::new();
        for (name, tracepoint) in PROGRAMS {
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| tracker_err(format!("object has no program {name}")))?
                .try_into()
                .map_err(|e| tracker_err(format!("{name}: {e}")))?;
            prog.load(tracepoint, &kernel_btf).map_err(|e| {
                let log = match &e {
                    aya::programs::ProgramError::LoadError { verifier_log, .. } => {
                        format!("\nverifier log:\n{verifier_log}")
                    }
                    _ => String::new(),
                };
                tracker_err(format!(
                    "program {name} (tp_btf/{tracepoint}) failed to load: {e}{log}"
                ))
            })?;
            let pin = generation.as_ref().map(|g| g.link(name));
            if let Some(p) = pin.as_ref().filter(|p| p.exists()) {
                match PinnedLink::from_pin(p) {
                    Ok(l) => {
                        // The earlier daemon's program goes on counting.
                        links.push((l.into(), pin.clone()));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(pin = %p.display(), error = %e, "unusable pinned link; attaching afresh");
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
            let id = prog.attach().map_err(|e| {
                tracker_err(format!("attaching {name} to tp_btf/{tracepoint}: {e}"))
            })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| tracker_err(format!("{name}: {e}")))?
                .into();
            match &pin {
                Some(p) => {
                    let pinned = link
                        .pin(p)
                        .map_err(|e| tracker_err(format!("pinning {name}: {e}")))?;
                    links.push((pinned.into(), pin.clone()));
                }
                None => links.push((link, None)),
            }
        }
        if let Some(g) = &generation {
            for old in g.others() {
                tracing::info!(dir = %old.dir().display(), "replacing the pinned tracker of another qosd build");
                let _ = old.remove();
            }
        }
        tracing::info!(kernel = %kernel, pinned = generation.is_some(), "writeback tracker attached");
        Ok(Self {
            ebpf,
            kernel,
            generation,
            links,
        })
    }

    /// Detaches both programs and removes the pins (the whole generation).
    pub fn detach(mut self) {
        for (link, pin) in std::mem::take(&mut self.links) {
            if let Some(p) = pin {
                let _ = std::fs::remove_file(p);
            }
            drop(link);
        }
        if let Some(g) = self.generation.take() {
            let _ = g.remove();
        }
    }

    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &str,
    ) -> Result<BpfHashMap<&MapData, K, V>, BlkioError> {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| tracker_err(format!("no map {name}")))?;
        BpfHashMap::try_from(map).map_err(|e| tracker_err(format!("{name}: {e}")))
    }

    fn hash_mut<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<BpfHashMap<&mut MapData, K, V>, BlkioError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| tracker_err(format!("no map {name}")))?;
        BpfHashMap::try_from(map).map_err(|e| tracker_err(format!("{name}: {e}")))
    }

    /// Counters per (io cgroup id, kernel dev).
    pub fn counters(&self) -> Result<HashMap<(u64, u32), IoCounters>, BlkioError> {
        let m = self.hash::<StatsKey, IoCounters>("IO_STATS")?;
        Ok(m.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| ((k.cgroup, k.dev), v))
            .collect())
    }

    /// Totals per kernel dev.
    pub fn devices(&self) -> Result<HashMap<u32, DeviceCounters>, BlkioError> {
        let m = self.hash::<u32, DeviceCounters>("IO_DEVICES")?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// Every tracked inode.
    pub fn inodes(&self) -> Result<Vec<(InodeKey, InodeInfo)>, BlkioError> {
        let m = self.hash::<InodeKey, InodeInfo>("IO_INODES")?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// The ranges `0..=max_range` of a file that have pending bytes, with
    /// their info (one map handle for all the lookups).
    pub fn pending_ranges(&self, key: InodeKey, max_range: u64) -> Vec<(u64, RangeInfo)> {
        let Ok(m) = self.hash::<RangeKey, RangeInfo>("IO_RANGES") else {
            return Vec::new();
        };
        (0..=max_range)
            .filter_map(|range| {
                let rk = RangeKey {
                    dev: key.dev,
                    _pad: 0,
                    ino: key.ino,
                    range,
                };
                m.get(&rk, 0)
                    .ok()
                    .filter(|r| r.pending > 0)
                    .map(|r| (range, r))
            })
            .collect()
    }

    /// After a whole flush of an inode (or of some of its ranges) during
    /// which nobody dirtied it (`dirtied`: its ever-dirtied bytes when the
    /// flush was handed out): bytes still pending were dropped before
    /// writeback (truncate), since the flush wrote every dirty page, and
    /// would otherwise look dirty forever; they are cleared. A file written
    /// meanwhile is left alone: its count is exact, and its pages may be
    /// dirty again behind the flush.
    pub fn settle(
        &mut self,
        key: InodeKey,
        dirtied: u64,
        ranges: &[u64],
    ) -> Result<(), BlkioError> {
        let mut m = self.hash_mut::<InodeKey, InodeInfo>("IO_INODES")?;
        let Ok(mut info) = m.get(&key, 0) else {
            return Ok(());
        };
        if info.dirtied != dirtied {
            return Ok(());
        }
        if ranges.is_empty() {
            info.pending = 0;
            let _ = m.insert(key, info, 0);
            return Ok(());
        }
        let mut r = self.hash_mut::<RangeKey, RangeInfo>("IO_RANGES")?;
        for &range in ranges {
            let rk = RangeKey {
                dev: key.dev,
                _pad: 0,
                ino: key.ino,
                range,
            };
            if let Ok(mut range) = r.get(&rk, 0) {
                range.pending = 0;
                let _ = r.insert(rk, range, 0);
            }
        }
        Ok(())
    }

    /// Forgets an inode that no longer exists (and the ranges it had).
    pub fn forget(&mut self, key: InodeKey) -> Result<(), BlkioError> {
        let mut m = self.hash_mut::<InodeKey, InodeInfo>("IO_INODES")?;
        let Ok(info) = m.get(&key, 0) else {
            return Ok(());
        };
        let _ = m.remove(&key);
        let mut r = self.hash_mut::<RangeKey, RangeInfo>("IO_RANGES")?;
        for range in 0..=info.max_range.min(RANGE_ENTRIES as u64) {
            let _ = r.remove(&RangeKey {
                dev: key.dev,
                _pad: 0,
                ino: key.ino,
                range,
            });
        }
        Ok(())
    }

    /// Entries in use per map (for the memory report).
    pub fn entries(&self) -> Vec<(&'static str, usize, u32)> {
        vec![
            (
                "IO_STATS",
                self.count::<StatsKey, IoCounters>("IO_STATS"),
                STATS_ENTRIES,
            ),
            (
                "IO_DEVICES",
                self.count::<u32, DeviceCounters>("IO_DEVICES"),
                DEVICE_ENTRIES,
            ),
            (
                "IO_INODES",
                self.count::<InodeKey, InodeInfo>("IO_INODES"),
                INODE_ENTRIES,
            ),
            (
                "IO_RANGES",
                self.count::<RangeKey, RangeInfo>("IO_RANGES"),
                RANGE_ENTRIES,
            ),
        ]
    }

    /// Keys in a map (values are not copied to count them).
    fn count<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> usize {
        self.hash::<K, V>(name)
            .map_or(0, |m| m.keys().filter(Result::is_ok).count())
    }

    pub fn program_costs(&self) -> Vec<ProgramCost> {
        PROGRAMS
            .iter()
            .filter_map(|(name, _)| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some(ProgramCost {
                    name: (*name).to_owned(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }
}
