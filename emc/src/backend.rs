//! The kernel-facing half: cgroup memory files of a v1 memory hierarchy or
//! of cgroup2, behind one type. Every write names the file it failed on.
//!
//! | what            | v1 (legacy, hybrid)                         | v2                      |
//! |-----------------|---------------------------------------------|-------------------------|
//! | guarantee       | `memory.soft_limit_in_bytes` (a hint)       | `memory.min`            |
//! | limit           | `memory.limit_in_bytes`, OOM killer on      | `memory.max`            |
//! | cap (elastic)   | `memory.limit_in_bytes` lowered, OOM killer | `memory.high`           |
//! |                 | held (`memory.oom_control`): tasks wait     |                         |
//! | reclaim         | lowering `memory.limit_in_bytes` (synchronous) | `memory.reclaim`     |
//! | kill            | freezer + SIGKILL (SIGKILL loop without it) | `cgroup.kill`           |
//! | pressure        | `memory.pressure` of the same-named cgroup2 directory | `memory.pressure` |

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use qos_core::{CgroupMode, Hierarchy};
use serde::Serialize;

use crate::{EmcError, policy::HostSample, psi::Psi};

/// Which kind of memory controller the host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    V1,
    V2,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

/// One reading of a cgroup's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CgroupMem {
    /// Everything charged (anonymous, page cache, kernel).
    pub usage: u64,
    pub anon: u64,
    pub file: u64,
    pub inactive_file: u64,
    /// v1: tasks wait in an OOM the killer was held back from.
    pub paused: bool,
    /// OOM kills the kernel did in this cgroup (ever).
    pub oom_kills: u64,
    /// v2: times the cgroup was throttled at `memory.high`.
    pub high_events: u64,
    pub psi: Option<Psi>,
}

/// The memory controller of a host.
#[derive(Clone, Debug)]
pub struct Backend {
    kind: BackendKind,
    /// Root of the hierarchy holding the memory controller.
    root: PathBuf,
    /// The cgroup2 mount: pressure files and `cgroup.kill` (on v1 hosts, of
    /// the same-named cgroup2 directory).
    unified: Option<PathBuf>,
    /// v1 freezer mount.
    freezer: Option<PathBuf>,
    /// `/proc`, replaced by fixtures.
    proc_root: PathBuf,
}

fn io_err(path: &Path, source: std::io::Error) -> EmcError {
    EmcError::Io {
        path: path.into(),
        source,
    }
}

fn read(path: &Path) -> Result<String, EmcError> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, e))
}

fn write(path: &Path, value: &str) -> Result<(), EmcError> {
    std::fs::write(path, value).map_err(|e| io_err(path, e))
}

/// Where a v2 cgroup's tasks are held when it is full: `memory.high` this far
/// under `memory.max` (1/32 of it, 4–256 MiB).
pub fn v2_hold_point(max: u64) -> u64 {
    // At most half of a tiny limit, so the hold never throttles at zero.
    max.saturating_sub((max / 32).clamp(4 << 20, 256 << 20).min(max / 2))
}

/// A held v2 scope counts as full when its usage is this close to the hold.
const HOLD_SLACK: u64 = 4 << 20;

fn read_u64(path: &Path) -> Result<u64, EmcError> {
    let text = read(path)?;
    let t = text.trim();
    if t == "max" {
        return Ok(u64::MAX);
    }
    t.parse().map_err(|_| EmcError::Parse {
        path: path.into(),
        content: t.chars().take(64).collect(),
    })
}

/// `key value` lines (memory.stat, memory.events, memory.oom_control).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn is_busy(e: &EmcError) -> bool {
    matches!(e, EmcError::Io { source, .. }
        if matches!(source.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)))
}

/// v1 reports "no limit" as a huge page-aligned number.
const V1_UNLIMITED: u64 = 1 << 62;

impl Backend {
    /// Picks the memory controller of the host: a v1 memory hierarchy when
    /// there is one (v1 and hybrid hosts), otherwise cgroup2 with `memory`
    /// in its controllers.
    pub fn detect(h: &Hierarchy) -> Result<Self, EmcError> {
        let unified = h.unified_root().ok().map(Path::to_owned);
        if let Some(root) = h.v1_mount("memory") {
            return Ok(Self {
                kind: BackendKind::V1,
                root: root.into(),
                unified,
                freezer: h.v1_mount("freezer").map(Path::to_owned),
                proc_root: "/proc".into(),
            });
        }
        let root = h.unified_root()?.to_owned();
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if h.mode() == CgroupMode::V1 || !controllers.split_whitespace().any(|c| c == "memory") {
            return Err(EmcError::NoController(root));
        }
        Ok(Self {
            kind: BackendKind::V2,
            root,
            unified,
            freezer: None,
            proc_root: "/proc".into(),
        })
    }

    /// A backend over fixture directories (tests without root).
    pub fn fixture(
        kind: BackendKind,
        root: &Path,
        unified: Option<&Path>,
        proc_root: &Path,
    ) -> Self {
        Self {
            kind,
            root: root.into(),
            unified: unified.map(Path::to_owned),
            freezer: None,
            proc_root: proc_root.into(),
        }
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.dir(name).is_dir()
    }

    fn file(&self, name: &str, file: &str) -> PathBuf {
        self.dir(name).join(file)
    }

    /// The pressure file of a cgroup (the same-named cgroup2 directory on v1
    /// hosts), when the kernel has one.
    pub fn psi_path(&self, name: &str) -> Option<PathBuf> {
        let p = self.unified.as_ref()?.join(name).join("memory.pressure");
        p.exists().then_some(p)
    }

    pub fn host_psi_path(&self) -> PathBuf {
        self.proc_root.join("pressure/memory")
    }

    fn meminfo(&self) -> Result<(u64, u64, u64), EmcError> {
        let path = self.proc_root.join("meminfo");
        let text = read(&path)?;
        let kb = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|v| v * 1024)
        };
        let total = kb("MemTotal:").ok_or_else(|| EmcError::Parse {
            path: path.clone(),
            content: "no MemTotal".into(),
        })?;
        let available = kb("MemAvailable:").unwrap_or(0);
        let swap = kb("SwapTotal:").unwrap_or(0);
        Ok((total, available, swap))
    }

    /// Whether anonymous memory can be reclaimed (the host has swap).
    pub fn swap_enabled(&self) -> bool {
        self.meminfo().map(|(_, _, s)| s > 0).unwrap_or(false)
    }

    pub fn read(&self, name: &str) -> Result<CgroupMem, EmcError> {
        let psi = self.psi_path(name).and_then(|p| Psi::read(&p));
        match self.kind {
            BackendKind::V1 => {
                let usage = read_u64(&self.file(name, "memory.usage_in_bytes"))?;
                let stat = read(&self.file(name, "memory.stat"))?;
                let oom = read(&self.file(name, "memory.oom_control"))?;
                Ok(CgroupMem {
                    usage,
                    anon: keyed(&stat, "total_rss").unwrap_or(0),
                    file: keyed(&stat, "total_cache").unwrap_or(0),
                    inactive_file: keyed(&stat, "total_inactive_file").unwrap_or(0),
                    paused: keyed(&oom, "under_oom") == Some(1),
                    oom_kills: keyed(&oom, "oom_kill").unwrap_or(0),
                    high_events: 0,
                    psi,
                })
            }
            BackendKind::V2 => {
                let usage = read_u64(&self.file(name, "memory.current"))?;
                let stat = read(&self.file(name, "memory.stat"))?;
                let events = read(&self.file(name, "memory.events"))?;
                Ok(CgroupMem {
                    usage,
                    anon: keyed(&stat, "anon").unwrap_or(0),
                    file: keyed(&stat, "file").unwrap_or(0),
                    inactive_file: keyed(&stat, "inactive_file").unwrap_or(0),
                    paused: false,
                    oom_kills: keyed(&events, "oom_kill").unwrap_or(0),
                    high_events: keyed(&events, "high").unwrap_or(0),
                    psi,
                })
            }
        }
    }

    /// The whole host: MemTotal, in use = MemTotal − MemAvailable, host PSI.
    pub fn host_sample(&self) -> Result<HostSample, EmcError> {
        let (total, available, _) = self.meminfo()?;
        let psi = Psi::read(&self.host_psi_path()).unwrap_or_default();
        Ok(HostSample {
            capacity: total,
            used: total.saturating_sub(available),
            psi_some10: psi.some_avg10,
            psi_full10: psi.full_avg10,
            paused: false,
        })
    }

    /// A cgroup standing for the host: its limit is the capacity, its
    /// charge minus inactive page cache is in use, and its tasks waiting in a
    /// held-back OOM mean the scope is out of memory.
    /// `held_by_us`: the controller holds this scope (v2: at
    /// [`v2_hold_point`]); only then does being at `memory.high` mean tasks
    /// wait for the controller (someone else's `memory.high` does not).
    pub fn scope_sample(&self, name: &str, held_by_us: bool) -> Result<HostSample, EmcError> {
        let (total, _, _) = self.meminfo()?;
        let limit = match self.kind {
            BackendKind::V1 => read_u64(&self.file(name, "memory.limit_in_bytes"))?,
            BackendKind::V2 => read_u64(&self.file(name, "memory.max"))?,
        };
        let m = self.read(name)?;
        let psi = m.psi.unwrap_or_default();
        // v2: a scope held at its memory.high (see `hold_oom_killer`) with
        // no page cache left to give is what v1 calls under_oom: its tasks
        // wait for the controller. (Page cache alone fills a scope up to
        // its memory.high: usage there means nothing.)
        let used = m.usage.saturating_sub(m.inactive_file);
        let held = self.kind == BackendKind::V2
            && held_by_us
            && limit != u64::MAX
            && read_u64(&self.file(name, "memory.high")).is_ok_and(|high| {
                high == v2_hold_point(limit) && m.usage.saturating_sub(m.file) + HOLD_SLACK >= high
            });
        Ok(HostSample {
            capacity: if limit >= V1_UNLIMITED {
                total
            } else {
                limit.min(total)
            },
            used,
            psi_some10: psi.some_avg10,
            psi_full10: psi.full_avg10,
            paused: m.paused || held,
        })
    }

    /// cgroup2: the memory files of a cgroup exist only when every ancestor
    /// enables the controller for its children; enables it where missing
    /// (as a v2 init system does for delegated trees). The kernel refuses
    /// (EBUSY) in a parent that has processes of its own: that error names
    /// the parent.
    fn ensure_v2_memory(&self, name: &str) -> Result<(), EmcError> {
        if self.kind != BackendKind::V2 || self.file(name, "memory.min").exists() {
            return Ok(());
        }
        let mut dir = self.root.clone();
        let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
        for part in parts {
            let control = dir.join("cgroup.subtree_control");
            let current = read(&control)?;
            if !current.split_whitespace().any(|c| c == "memory") {
                write(&control, "+memory")?;
            }
            dir.push(part);
        }
        Ok(())
    }

    /// Protects `bytes` of the cgroup (None: protection off).
    pub fn set_guarantee(&self, name: &str, bytes: Option<u64>) -> Result<(), EmcError> {
        self.ensure_v2_memory(name)?;
        match self.kind {
            BackendKind::V1 => write(
                &self.file(name, "memory.soft_limit_in_bytes"),
                &bytes.map_or("-1".into(), |b| b.to_string()),
            ),
            BackendKind::V2 => write(
                &self.file(name, "memory.min"),
                &bytes.map_or("0".into(), |b| b.to_string()),
            ),
        }
    }

    /// Whether tasks wait (true) or the kernel OOM-kills (false) when the
    /// cgroup is full; returns whether a hold is in place. v1: `oom_control`.
    /// v2 has no such switch: holding puts `memory.high` a little under
    /// `memory.max` ([`v2_hold_point`]), where the kernel throttles the tasks
    /// instead of killing them (written only when it differs, so it can be
    /// re-applied every step and follows a changed `memory.max`); without a
    /// `memory.max` there is no cgroup OOM killer to hold. Releasing a v2
    /// hold is [`Backend::restore_memory_high`].
    pub fn hold_oom_killer(&self, name: &str, hold: bool) -> Result<bool, EmcError> {
        match self.kind {
            BackendKind::V1 => {
                write(
                    &self.file(name, "memory.oom_control"),
                    if hold { "1" } else { "0" },
                )?;
                Ok(hold)
            }
            BackendKind::V2 => {
                let high = self.file(name, "memory.high");
                if !hold {
                    write(&high, "max")?;
                    return Ok(false);
                }
                let max = read_u64(&self.file(name, "memory.max"))?;
                if max == u64::MAX {
                    return Ok(false);
                }
                let point = v2_hold_point(max);
                if read_u64(&high)? != point {
                    write(&high, &point.to_string())?;
                }
                Ok(true)
            }
        }
    }

    /// v2: the cgroup's `memory.high` as written (`max` or bytes), to be
    /// given back by [`Backend::restore_memory_high`].
    pub fn memory_high(&self, name: &str) -> Result<String, EmcError> {
        Ok(read(&self.file(name, "memory.high"))?.trim().to_owned())
    }

    /// v2: puts back a `memory.high` saved by [`Backend::memory_high`].
    pub fn restore_memory_high(&self, name: &str, value: &str) -> Result<(), EmcError> {
        write(&self.file(name, "memory.high"), value)
    }

    /// Puts `cap` (elastic: tasks wait at it) and `limit` (hard: the kernel
    /// kills at it) in force. A cap below current usage is raised to the
    /// usage: capping never reclaims (see [`Backend::reclaim`]).
    pub fn set_cap(
        &self,
        name: &str,
        cap: Option<u64>,
        limit: Option<u64>,
    ) -> Result<(), EmcError> {
        match self.kind {
            BackendKind::V1 => {
                let limit_file = self.file(name, "memory.limit_in_bytes");
                match cap.filter(|c| limit.is_none_or(|l| c < &l)) {
                    Some(cap) => {
                        self.hold_oom_killer(name, true)?;
                        let usage = read_u64(&self.file(name, "memory.usage_in_bytes"))?;
                        let target = cap.max(usage);
                        if let Err(e) = write(&limit_file, &target.to_string()) {
                            // Grew between the read and the write.
                            if !is_busy(&e) {
                                return Err(e);
                            }
                            let usage = read_u64(&self.file(name, "memory.usage_in_bytes"))?;
                            write(&limit_file, &(usage + (4 << 20)).to_string())?;
                        }
                        Ok(())
                    }
                    None => {
                        write(&limit_file, &limit.map_or("-1".into(), |l| l.to_string()))?;
                        self.hold_oom_killer(name, false).map(|_| ())
                    }
                }
            }
            BackendKind::V2 => {
                self.ensure_v2_memory(name)?;
                write(
                    &self.file(name, "memory.max"),
                    &limit.map_or("max".into(), |l| l.to_string()),
                )?;
                write(
                    &self.file(name, "memory.high"),
                    &cap.map_or("max".into(), |c| c.to_string()),
                )
            }
        }
    }

    /// Reclaims about `bytes` from the cgroup and leaves it capped at `cap`.
    /// Returns what was freed; [`EmcError::ReclaimBlocked`] when the kernel
    /// found less than asked (the cap then stays where usage ended).
    pub fn reclaim(&self, name: &str, bytes: u64, cap: u64) -> Result<u64, EmcError> {
        let before = self.read(name)?.usage;
        let blocked = |freed| EmcError::ReclaimBlocked {
            cgroup: name.into(),
            freed,
        };
        match self.kind {
            BackendKind::V1 => {
                self.hold_oom_killer(name, true)?;
                let limit_file = self.file(name, "memory.limit_in_bytes");
                match write(&limit_file, &cap.to_string()) {
                    Ok(()) => Ok(before.saturating_sub(self.read(name)?.usage)),
                    Err(e) if is_busy(&e) => {
                        let now = self.read(name)?.usage;
                        write(&limit_file, &now.to_string())?;
                        Err(blocked(before.saturating_sub(now)))
                    }
                    Err(e) => Err(e),
                }
            }
            BackendKind::V2 => {
                let r = write(&self.file(name, "memory.reclaim"), &bytes.to_string());
                write(&self.file(name, "memory.high"), &cap.to_string())?;
                let freed = before.saturating_sub(self.read(name)?.usage);
                match r {
                    Ok(()) => Ok(freed),
                    Err(e) if is_busy(&e) => Err(blocked(freed)),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Removes everything this backend set on the cgroup.
    pub fn clear(&self, name: &str) -> Result<(), EmcError> {
        self.set_cap(name, None, None)?;
        self.set_guarantee(name, None)
    }

    fn pids(path: &Path) -> Vec<i32> {
        std::fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every process of the cgroup; returns how many were signalled.
    pub fn kill(&self, name: &str) -> Result<usize, EmcError> {
        let dir = self.dir(name);
        if self.kind == BackendKind::V2 {
            write(&dir.join("cgroup.kill"), "1")?;
            return Ok(Self::pids(&dir).len());
        }
        // v1: freeze so that nothing forks while we signal, when the
        // freezer hierarchy has the same cgroup.
        let frozen = self
            .freezer
            .as_ref()
            .map(|f| f.join(name))
            .filter(|d| d.join("freezer.state").exists())
            .filter(|d| write(&d.join("freezer.state"), "FROZEN").is_ok());
        if let Some(f) = &frozen {
            let end = Instant::now() + Duration::from_secs(1);
            while Instant::now() < end
                && std::fs::read_to_string(f.join("freezer.state"))
                    .map(|s| s.trim() != "FROZEN")
                    .unwrap_or(false)
            {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let mut killed = BTreeSet::new();
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let pids = Self::pids(&dir);
            if pids.is_empty() || Instant::now() >= end {
                break;
            }
            for p in pids {
                if nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .is_ok()
                {
                    killed.insert(p);
                }
            }
            if let Some(f) = &frozen {
                // Killed tasks leave only once thawed.
                let _ = write(&f.join("freezer.state"), "THAWED");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(f) = &frozen {
            let _ = write(&f.join("freezer.state"), "THAWED");
        }
        Ok(killed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    struct Fx {
        _dir: tempfile::TempDir,
        root: PathBuf,
        unified: PathBuf,
        proc_root: PathBuf,
    }

    fn fx() -> Fx {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("memory");
        let unified = dir.path().join("unified");
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(proc_root.join("pressure")).expect("mkdir");
        std::fs::write(
            proc_root.join("meminfo"),
            "MemTotal:       1048576 kB\nMemFree:  1000 kB\nMemAvailable:    262144 kB\nSwapTotal:  0 kB\n",
        )
        .expect("meminfo");
        std::fs::write(
            proc_root.join("pressure/memory"),
            "some avg10=3.00 avg60=0.00 avg300=0.00 total=1\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=1\n",
        )
        .expect("psi");
        Fx {
            _dir: dir,
            root,
            unified,
            proc_root,
        }
    }

    fn v1_cgroup(fx: &Fx, name: &str, usage: u64) {
        let d = fx.root.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        for (f, v) in [
            ("memory.usage_in_bytes", usage.to_string()),
            ("memory.limit_in_bytes", "9223372036854771712".into()),
            ("memory.soft_limit_in_bytes", "9223372036854771712".into()),
            (
                "memory.stat",
                format!(
                    "cache 1\nrss 2\ntotal_cache {}\ntotal_rss {}\ntotal_inactive_file {}\n",
                    100 * MB,
                    50 * MB,
                    40 * MB
                ),
            ),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 1\noom_kill 3\n".into(),
            ),
        ] {
            std::fs::write(d.join(f), v).expect("write");
        }
        let u = fx.unified.join(name);
        std::fs::create_dir_all(&u).expect("mkdir");
        std::fs::write(
            u.join("memory.pressure"),
            "some avg10=7.50 avg60=0.00 avg300=0.00 total=9\nfull avg10=2.00 avg60=0.00 avg300=0.00 total=4\n",
        )
        .expect("psi");
    }

    fn content(p: &Path) -> String {
        std::fs::read_to_string(p).expect("read").trim().to_owned()
    }

    #[test]
    fn v1_reads_usage_oom_state_and_the_cgroup2_pressure() {
        let fx = fx();
        v1_cgroup(&fx, "a", 150 * MB);
        let b = Backend::fixture(BackendKind::V1, &fx.root, Some(&fx.unified), &fx.proc_root);
        let m = b.read("a").expect("read");
        assert_eq!(m.usage, 150 * MB);
        assert_eq!(m.file, 100 * MB);
        assert_eq!(m.anon, 50 * MB);
        assert_eq!(m.inactive_file, 40 * MB);
        assert!(m.paused);
        assert_eq!(m.oom_kills, 3);
        assert_eq!(m.psi.map(|p| p.some_avg10), Some(7.5));
        // The scope: unlimited → MemTotal; used excludes inactive cache.
        let s = b.scope_sample("a", false).expect("scope");
        assert_eq!(s.capacity, 1024 * MB);
        assert_eq!(s.used, 110 * MB);
        assert!(s.paused);
        let h = b.host_sample().expect("host");
        assert_eq!((h.capacity, h.used), (1024 * MB, 768 * MB));
        assert_eq!(h.psi_some10, 3.0);
        assert!(!b.swap_enabled());
        let e = b.read("missing").expect_err("missing").to_string();
        assert!(e.contains("missing/memory.usage_in_bytes"), "{e}");
    }

    #[test]
    fn v1_cap_holds_the_oom_killer_and_release_gives_it_back() {
        let fx = fx();
        v1_cgroup(&fx, "a", 150 * MB);
        let b = Backend::fixture(BackendKind::V1, &fx.root, Some(&fx.unified), &fx.proc_root);
        let d = fx.root.join("a");
        b.set_guarantee("a", Some(100 * MB)).expect("guarantee");
        assert_eq!(
            content(&d.join("memory.soft_limit_in_bytes")),
            (100 * MB).to_string()
        );
        // A cap below usage is raised to the usage.
        b.set_cap("a", Some(120 * MB), Some(400 * MB)).expect("cap");
        assert_eq!(
            content(&d.join("memory.limit_in_bytes")),
            (150 * MB).to_string()
        );
        assert_eq!(content(&d.join("memory.oom_control")), "1");
        b.set_cap("a", Some(200 * MB), Some(400 * MB)).expect("cap");
        assert_eq!(
            content(&d.join("memory.limit_in_bytes")),
            (200 * MB).to_string()
        );
        // A cap at the limit is the limit: the kernel kills there.
        b.set_cap("a", Some(400 * MB), Some(400 * MB))
            .expect("cap = limit");
        assert_eq!(
            content(&d.join("memory.limit_in_bytes")),
            (400 * MB).to_string()
        );
        assert_eq!(content(&d.join("memory.oom_control")), "0");
        b.clear("a").expect("clear");
        assert_eq!(content(&d.join("memory.limit_in_bytes")), "-1");
        assert_eq!(content(&d.join("memory.soft_limit_in_bytes")), "-1");
    }

    fn v2_cgroup(fx: &Fx, name: &str) {
        let d = fx.root.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        for (f, v) in [
            ("memory.current", (300 * MB).to_string()),
            ("memory.max", "max".into()),
            ("memory.high", "max".into()),
            ("memory.min", "0".into()),
            ("memory.reclaim", "".into()),
            ("memory.stat", format!("anon {}\nfile {}\ninactive_file {}\n", 200 * MB, 90 * MB, 30 * MB)),
            ("memory.events", "low 0\nhigh 12\nmax 0\noom 1\noom_kill 1\n".into()),
            ("memory.pressure", "some avg10=1.00 avg60=0.00 avg300=0.00 total=9\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=4\n".into()),
            ("cgroup.procs", "".into()),
            ("cgroup.kill", "".into()),
        ] {
            std::fs::write(d.join(f), v).expect("write");
        }
    }

    #[test]
    fn v2_uses_min_high_max_reclaim_and_kill() {
        let fx = fx();
        v2_cgroup(&fx, "t/a");
        // On v2 the cgroup2 tree is the memory hierarchy.
        let b = Backend::fixture(BackendKind::V2, &fx.root, Some(&fx.root), &fx.proc_root);
        let d = fx.root.join("t/a");
        let m = b.read("t/a").expect("read");
        assert_eq!((m.usage, m.anon, m.file), (300 * MB, 200 * MB, 90 * MB));
        assert_eq!((m.oom_kills, m.high_events), (1, 12));
        assert_eq!(m.psi.map(|p| p.some_avg10), Some(1.0));
        let s = b.scope_sample("t/a", false).expect("scope");
        assert_eq!((s.capacity, s.used), (1024 * MB, 270 * MB));
        b.set_guarantee("t/a", Some(64 * MB)).expect("min");
        assert_eq!(content(&d.join("memory.min")), (64 * MB).to_string());
        b.set_cap("t/a", Some(250 * MB), Some(500 * MB))
            .expect("cap");
        assert_eq!(content(&d.join("memory.high")), (250 * MB).to_string());
        assert_eq!(content(&d.join("memory.max")), (500 * MB).to_string());
        b.reclaim("t/a", 32 * MB, 268 * MB).expect("reclaim");
        assert_eq!(content(&d.join("memory.reclaim")), (32 * MB).to_string());
        assert_eq!(content(&d.join("memory.high")), (268 * MB).to_string());
        b.kill("t/a").expect("kill");
        assert_eq!(content(&d.join("cgroup.kill")), "1");
        b.clear("t/a").expect("clear");
        assert_eq!(content(&d.join("memory.high")), "max");
        assert_eq!(content(&d.join("memory.max")), "max");
        assert_eq!(content(&d.join("memory.min")), "0");
    }

    #[test]
    fn v2_holds_a_full_scope_at_high_under_max() {
        let fx = fx();
        v2_cgroup(&fx, "scope");
        let b = Backend::fixture(BackendKind::V2, &fx.root, Some(&fx.root), &fx.proc_root);
        let d = fx.root.join("scope");
        // Enables the controller on the way down when the files are missing.
        std::fs::write(fx.root.join("cgroup.subtree_control"), "").expect("control");
        std::fs::create_dir_all(fx.root.join("scope/b")).expect("mkdir");
        std::fs::write(fx.root.join("scope/cgroup.subtree_control"), "cpu").expect("control");
        b.set_guarantee("scope/b", Some(MB)).expect("guarantee");
        assert_eq!(
            content(&fx.root.join("scope/cgroup.subtree_control")),
            "+memory"
        );
        assert_eq!(content(&fx.root.join("cgroup.subtree_control")), "+memory");
        // No memory.max: no cgroup OOM killer, nothing to hold.
        b.hold_oom_killer("scope", true).expect("hold");
        assert_eq!(content(&d.join("memory.high")), "max");
        std::fs::write(d.join("memory.max"), (512 * MB).to_string()).expect("max");
        b.hold_oom_killer("scope", true).expect("hold");
        assert_eq!(content(&d.join("memory.high")), (496 * MB).to_string());
        assert_eq!(v2_hold_point(64 * MB), 60 * MB);
        assert_eq!(v2_hold_point(64 << 30), (64 << 30) - (256 << 20));
        assert_eq!(v2_hold_point(4 * MB), 2 * MB);
        // 300 MiB in use: not full.
        assert!(!b.scope_sample("scope", true).expect("sample").paused);
        // At the hold, but 30 MiB of it inactive page cache: not full.
        std::fs::write(d.join("memory.current"), (494 * MB).to_string()).expect("current");
        assert!(!b.scope_sample("scope", true).expect("sample").paused);
        std::fs::write(
            d.join("memory.stat"),
            format!("anon {}\nfile 0\ninactive_file 0\n", 494 * MB),
        )
        .expect("stat");
        assert!(b.scope_sample("scope", true).expect("sample").paused);
        // Not our hold (someone else's memory.high at the same place, or a
        // stale one after memory.max changed): not "waiting for us".
        assert!(!b.scope_sample("scope", false).expect("sample").paused);
        std::fs::write(d.join("memory.max"), (1024 * MB).to_string()).expect("max");
        assert!(!b.scope_sample("scope", true).expect("sample").paused);
        b.hold_oom_killer("scope", true).expect("re-hold");
        assert_eq!(content(&d.join("memory.high")), (992 * MB).to_string());
        std::fs::write(d.join("memory.max"), (512 * MB).to_string()).expect("max");
        b.hold_oom_killer("scope", true).expect("re-hold");
        b.hold_oom_killer("scope", false).expect("release");
        assert_eq!(content(&d.join("memory.high")), "max");
        assert!(!b.scope_sample("scope", true).expect("sample").paused);
    }
}
