//! `qosd --probe`: what this kernel offers the toolkit and which mode each
//! subsystem picks on it. Loads every eBPF program (verified, never
//! attached) and reads mounts; changes nothing on the host.

use std::path::{Path, PathBuf};

use qos_core::{
    CgroupMode, Hierarchy,
    probe::{ProgramProbe, kernel_release, kernel_version},
};
use serde::Serialize;

/// Everything the probe found.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub kernel: String,
    pub cgroup: CgroupReport,
    pub features: Features,
    pub modes: Modes,
    pub programs: Vec<ProgramProbe>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CgroupReport {
    /// `v1`, `v2` or `hybrid`.
    pub mode: String,
    pub cgroup2_root: Option<PathBuf>,
    /// Controllers the cgroup2 root offers.
    pub cgroup2_controllers: Vec<String>,
    /// Controllers mounted as v1 hierarchies.
    pub v1_controllers: Vec<String>,
}

/// Kernel features the subsystems use or adapt to.
#[derive(Clone, Debug, Serialize)]
pub struct Features {
    /// /sys/kernel/btf/vmlinux: the IO tracker reads struct offsets from it.
    pub btf: bool,
    /// tcx links (6.6+); older kernels get cls_bpf under clsact.
    pub tcx: bool,
    /// Pressure stall information (/proc/pressure), EMC's early signal.
    pub psi: bool,
    /// cgroup.kill (5.14+), EMC's last resort on v2.
    pub cgroup_kill: bool,
    /// memory.reclaim (5.19+) with memory on cgroup2: EMC reclaims
    /// proactively instead of by lowering memory.high.
    pub memory_reclaim: bool,
    /// Both io and memory on cgroup2: the kernel itself charges writeback
    /// to the cgroup that dirtied the pages.
    pub writeback_attribution: bool,
    /// kernel.bpf_stats_enabled: per-program run time.
    pub bpf_stats: bool,
}

/// The mode each subsystem picks here (or why it cannot run).
#[derive(Clone, Debug, Serialize)]
pub struct Modes {
    pub net: String,
    pub io: String,
    pub memory: String,
}

impl KernelReport {
    /// Probes the running kernel.
    pub fn probe() -> Self {
        let kernel = kernel_release();
        let hierarchy = Hierarchy::detect().ok();
        let cgroup = match &hierarchy {
            Some(h) => {
                let root = h.unified_root().ok().map(Path::to_owned);
                let controllers = root
                    .as_ref()
                    .and_then(|r| std::fs::read_to_string(r.join("cgroup.controllers")).ok())
                    .map(|s| s.split_whitespace().map(str::to_owned).collect())
                    .unwrap_or_default();
                CgroupReport {
                    mode: h.mode().to_string(),
                    cgroup2_root: root,
                    cgroup2_controllers: controllers,
                    v1_controllers: h.v1_controllers().map(str::to_owned).collect(),
                }
            }
            None => CgroupReport {
                mode: "none".into(),
                cgroup2_root: None,
                cgroup2_controllers: Vec::new(),
                v1_controllers: Vec::new(),
            },
        };
        let on_v2 = |c: &str| cgroup.cgroup2_controllers.iter().any(|x| x == c);
        let version = kernel_version(&kernel);
        let at_least = |major: u32, minor: u32| version.is_some_and(|v| v >= (major, minor));
        let tc = netqos::datapath::tc_attach_mode();
        let features = Features {
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            tcx: tc == netqos::datapath::TcAttachMode::Tcx,
            psi: Path::new("/proc/pressure/memory").exists(),
            cgroup_kill: at_least(5, 14) && cgroup.cgroup2_root.is_some(),
            memory_reclaim: at_least(5, 19) && on_v2("memory"),
            writeback_attribution: on_v2("io") && on_v2("memory"),
            bpf_stats: Path::new("/proc/sys/kernel/bpf_stats_enabled").exists(),
        };
        let modes = match &hierarchy {
            Some(h) => Modes {
                net: match h.mode() {
                    CgroupMode::V1 => format!(
                        "{tc} on the interface; cgroup programs need a cgroup2 mount (qosd mounts one)"
                    ),
                    _ => format!(
                        "{tc} on the interface; cgroup_skb and sock_ops on the cgroup2 root"
                    ),
                },
                io: blkio::Backend::detect(h)
                    .map(|b| b.mode().to_string())
                    .unwrap_or_else(|e| format!("unavailable: {e}")),
                memory: emc::Backend::detect(h)
                    .map(|b| b.kind().to_string())
                    .unwrap_or_else(|e| format!("unavailable: {e}")),
            },
            None => {
                let none = "unavailable: no cgroup hierarchy mounted".to_owned();
                Modes {
                    net: none.clone(),
                    io: none.clone(),
                    memory: none,
                }
            }
        };
        let mut programs = netqos::datapath::probe_programs();
        programs.extend(blkio::tracker::probe_programs());
        Self {
            kernel,
            cgroup,
            features,
            modes,
            programs,
        }
    }

    /// Every program loaded.
    pub fn all_loaded(&self) -> bool {
        self.programs.iter().all(|p| p.loaded)
    }

    /// The report for people.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let yes = |b: bool| if b { "yes" } else { "no" };
        let f = &self.features;
        let _ = writeln!(s, "kernel            {}", self.kernel);
        let _ = writeln!(
            s,
            "cgroups           {} (cgroup2 at {}: {}; v1: {})",
            self.cgroup.mode,
            self.cgroup
                .cgroup2_root
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string()),
            or_none(&self.cgroup.cgroup2_controllers),
            or_none(&self.cgroup.v1_controllers),
        );
        let _ = writeln!(
            s,
            "features          btf {}, tcx {}, psi {}, cgroup.kill {}, memory.reclaim {}, \
             kernel writeback attribution {}, bpf stats {}",
            yes(f.btf),
            yes(f.tcx),
            yes(f.psi),
            yes(f.cgroup_kill),
            yes(f.memory_reclaim),
            yes(f.writeback_attribution),
            yes(f.bpf_stats)
        );
        let _ = writeln!(s, "net mode          {}", self.modes.net);
        let _ = writeln!(s, "io mode           {}", self.modes.io);
        let _ = writeln!(s, "memory mode       {}", self.modes.memory);
        for p in &self.programs {
            let _ = writeln!(
                s,
                "program           {:<8} {:<16} {:<36} {}",
                p.object,
                p.program,
                p.kind,
                if p.loaded { "loads" } else { "REJECTED" }
            );
            if let Some(e) = &p.error {
                for line in e.lines() {
                    let _ = writeln!(s, "                  | {line}");
                }
            }
        }
        s
    }
}

fn or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}
