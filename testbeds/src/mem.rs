//! Memory testbeds: a cgroup in the memory hierarchy (the v1 memory mount on
//! v1/hybrid hosts, cgroup2 otherwise) plus, on hybrid hosts, the
//! same-named cgroup2 directory where the kernel keeps its pressure (PSI)
//! figures. Processes are placed in both.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
};

use anyhow::{Context, Result};

use crate::{kill_and_remove, unique};

/// A test cgroup in every hierarchy that matters for memory; processes
/// killed and directories removed on drop (children first).
#[derive(Debug)]
pub struct MemCgroup {
    name: String,
    memory_root: PathBuf,
    unified_root: Option<PathBuf>,
}

impl MemCgroup {
    /// Creates `<prefix><unique>` at the top of the memory hierarchy (and of
    /// the cgroup2 tree when that is a different tree).
    pub fn new(prefix: &str) -> Result<Self> {
        let h = qos_core::Hierarchy::detect()?;
        let memory_root = h.controller_root("memory")?.to_owned();
        let unified_root = h
            .unified_root()
            .ok()
            .filter(|u| *u != memory_root)
            .map(Path::to_owned);
        let cg = Self {
            name: unique(prefix),
            memory_root,
            unified_root,
        };
        cg.create(&cg.name)?;
        Ok(cg)
    }

    fn create(&self, name: &str) -> Result<()> {
        for root in self.roots() {
            let d = root.join(name);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    fn roots(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.memory_root).chain(self.unified_root.iter())
    }

    /// Creates a child; returns its name relative to the hierarchy roots.
    pub fn child(&self, child: &str) -> Result<String> {
        let name = format!("{}/{child}", self.name);
        self.create(&name)?;
        Ok(name)
    }

    /// Name of this cgroup relative to the hierarchy roots.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Directory of `name` (this cgroup or a child) in the memory hierarchy.
    pub fn memory_dir(&self, name: &str) -> PathBuf {
        self.memory_root.join(name)
    }

    /// Directory of `name` in the cgroup2 tree (PSI), when it exists.
    pub fn unified_dir(&self, name: &str) -> Option<PathBuf> {
        let root = self.unified_root.as_ref().unwrap_or(&self.memory_root);
        let d = root.join(name);
        d.is_dir().then_some(d)
    }

    /// Writes a memory control file of `name` (v1 or v2 file name).
    pub fn write(&self, name: &str, file: &str, value: &str) -> Result<()> {
        let p = self.memory_dir(name).join(file);
        std::fs::write(&p, value).with_context(|| format!("writing {value} to {}", p.display()))
    }

    /// Reads a memory control file of `name`.
    pub fn read(&self, name: &str, file: &str) -> Result<String> {
        let p = self.memory_dir(name).join(file);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }

    /// Whether memory is controlled through cgroup2 (else v1).
    pub fn is_v2(&self) -> bool {
        self.memory_dir("").join("cgroup.controllers").exists()
    }

    fn read_u64(&self, name: &str, file: &str) -> Result<Option<u64>> {
        let s = self.read(name, file)?;
        let s = s.trim();
        if s == "max" {
            return Ok(None);
        }
        let v: u64 = s
            .parse()
            .with_context(|| format!("{file} of {name} is not a number: {s}"))?;
        // v1 writes "unlimited" as a page-rounded i64::MAX.
        Ok((v < 1 << 60).then_some(v))
    }

    /// Sets the hard limit (v1 `memory.limit_in_bytes`, v2 `memory.max`).
    pub fn set_limit(&self, name: &str, bytes: u64) -> Result<()> {
        let file = if self.is_v2() {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        self.write(name, file, &bytes.to_string())
    }

    /// The hard limit the kernel kills at; None when unlimited.
    pub fn limit(&self, name: &str) -> Result<Option<u64>> {
        if self.is_v2() {
            self.read_u64(name, "memory.max")
        } else {
            self.read_u64(name, "memory.limit_in_bytes")
        }
    }

    /// Where the cgroup's tasks are held back (v1: the limit, with the OOM
    /// killer held; v2: `memory.high`); None when unlimited.
    pub fn cap(&self, name: &str) -> Result<Option<u64>> {
        if self.is_v2() {
            self.read_u64(name, "memory.high")
        } else {
            self.read_u64(name, "memory.limit_in_bytes")
        }
    }

    /// The protected amount (v1 `memory.soft_limit_in_bytes`, v2
    /// `memory.min`); None when nothing is protected.
    pub fn guarantee(&self, name: &str) -> Result<Option<u64>> {
        if self.is_v2() {
            Ok(self.read_u64(name, "memory.min")?.filter(|v| *v > 0))
        } else {
            self.read_u64(name, "memory.soft_limit_in_bytes")
        }
    }

    /// Bytes charged (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub fn usage(&self, name: &str) -> Result<u64> {
        let file = if self.is_v2() {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        Ok(self.read_u64(name, file)?.unwrap_or(0))
    }

    /// Processes the kernel OOM killer killed in the cgroup.
    pub fn oom_kills(&self, name: &str) -> Result<u64> {
        let file = if self.is_v2() {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        Ok(self
            .read(name, file)?
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Whether the cgroup is full and its tasks wait instead of being
    /// killed: v1 `under_oom 1` (OOM killer held); v2 usage at `memory.high`
    /// below `memory.max` with the kernel throttling (`high` events).
    pub fn held_at_cap(&self, name: &str) -> Result<bool> {
        if !self.is_v2() {
            return Ok(self
                .read(name, "memory.oom_control")?
                .contains("under_oom 1"));
        }
        let Some(high) = self.read_u64(name, "memory.high")? else {
            return Ok(false);
        };
        let events = self
            .read(name, "memory.events")?
            .lines()
            .find_map(|l| l.strip_prefix("high ")?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Ok(events > 0 && self.usage(name)? + (8 << 20) >= high)
    }

    /// Whether the kernel OOM killer acts normally in the cgroup again
    /// (v1 `oom_kill_disable 0`; v2: no `memory.high` hold below
    /// `memory.max`).
    pub fn oom_killer_released(&self, name: &str) -> Result<bool> {
        if self.is_v2() {
            Ok(self.read_u64(name, "memory.high")?.is_none())
        } else {
            Ok(self
                .read(name, "memory.oom_control")?
                .contains("oom_kill_disable 0"))
        }
    }

    /// Spawns `cmd` inside `name` in every hierarchy.
    pub fn spawn(&self, name: &str, cmd: &mut Command) -> Result<Child> {
        let procs: Vec<PathBuf> = self
            .roots()
            .map(|r| r.join(name).join("cgroup.procs"))
            .collect();
        crate::spawn_in(&procs, None, cmd)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for root in self.roots() {
            kill_and_remove(&root.join(&self.name));
        }
    }
}
