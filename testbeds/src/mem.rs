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
