//! The kernel's IO knobs, v1 and v2 behind one type.

use std::{
    fs,
    path::{Path, PathBuf},
};

use qos_core::cgroup::Hierarchy;
use serde::{Deserialize, Serialize};

use crate::{BlkioError, Device, IoLimits, io_err};

/// How limits reach buffered writes on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoMode {
    /// v1/hybrid `blkio`: the kernel throttles by issuing task, so writeback
    /// escapes; the toolkit flushes each group's dirty pages from inside the
    /// group, pauses writers that outrun their limit and holds leaks as debt.
    V1Assisted,
    /// cgroup2 with io and memory: the kernel attributes writeback itself
    /// (`io.max`, `io.weight`); the tracker verifies.
    V2Kernel,
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1Assisted => "v1-assisted (blkio throttle + flush helper + backpressure)",
            Self::V2Kernel => "v2-kernel (io.max / io.weight, kernel writeback attribution)",
        })
    }
}

#[derive(Clone, Debug)]
pub struct Backend {
    mode: IoMode,
    /// Root of the io hierarchy (v1 blkio mount, or the cgroup2 mount).
    root: PathBuf,
    /// v1 freezer mount (pausing writers); cgroup2 uses `cgroup.freeze`.
    freezer: Option<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<(), BlkioError> {
    fs::write(path, value).map_err(io_err(path))
}

impl Backend {
    /// Picks the mode from the host's mounts.
    pub fn detect(h: &Hierarchy) -> Result<Self, BlkioError> {
        if let Some(blkio) = h.v1_mount("blkio") {
            return Ok(Self {
                mode: IoMode::V1Assisted,
                root: blkio.to_owned(),
                freezer: h.v1_mount("freezer").map(Path::to_owned),
            });
        }
        let root = h.unified_root()?.to_owned();
        let controllers = fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(io_err(root.join("cgroup.controllers")))?;
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if !has("io") {
            return Err(BlkioError::Unsupported(
                "no io controller: neither a v1 blkio hierarchy nor io on cgroup2".into(),
            ));
        }
        if !has("memory") {
            return Err(BlkioError::Unsupported(
                "io is on cgroup2 but memory is not: the kernel cannot attribute writeback \
                 (memory and io must share the hierarchy)"
                    .into(),
            ));
        }
        Ok(Self {
            mode: IoMode::V2Kernel,
            root,
            freezer: None,
        })
    }

    /// A backend over fixture directories (tests).
    pub fn fixture(mode: IoMode, root: &Path, freezer: Option<&Path>) -> Self {
        Self {
            mode,
            root: root.to_owned(),
            freezer: freezer.map(Path::to_owned),
        }
    }

    pub fn mode(&self) -> IoMode {
        self.mode
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of a cgroup in the io hierarchy; it must exist.
    pub fn cgroup_dir(&self, name: &str) -> Result<PathBuf, BlkioError> {
        let dir = self.root.join(name);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(BlkioError::NoCgroup {
                cgroup: name.into(),
                path: dir,
            })
        }
    }

    /// Writes a group's limits on a device. `write_bps` is the effective
    /// write rate (the limit, or the weight's share where weights become
    /// rates); `bfq_weight` the weight to hand to BFQ, if it schedules.
    pub fn apply(
        &self,
        name: &str,
        dev: Device,
        limits: &IoLimits,
        write_bps: Option<u64>,
        bfq_weight: Option<u32>,
    ) -> Result<(), BlkioError> {
        let dir = self.cgroup_dir(name)?;
        let read_bps = limits.read_bps.map(|r| r.bytes_per_sec());
        match self.mode {
            IoMode::V1Assisted => {
                for (file, v) in [
                    ("blkio.throttle.write_bps_device", write_bps),
                    ("blkio.throttle.read_bps_device", read_bps),
                    ("blkio.throttle.write_iops_device", limits.write_iops),
                    ("blkio.throttle.read_iops_device", limits.read_iops),
                ] {
                    // 0 removes the device's rule.
                    write(&dir.join(file), &format!("{dev} {}", v.unwrap_or(0)))?;
                }
                if let Some(w) = bfq_weight {
                    write(&dir.join("blkio.bfq.weight_device"), &format!("{dev} {w}"))?;
                }
            }
            IoMode::V2Kernel => {
                self.enable_v2_controllers(&dir)?;
                let v = |x: Option<u64>| x.map_or("max".to_owned(), |x| x.to_string());
                write(
                    &dir.join("io.max"),
                    &format!(
                        "{dev} rbps={} wbps={} riops={} wiops={}",
                        v(read_bps),
                        v(limits.write_bps.map(|r| r.bytes_per_sec())),
                        v(limits.read_iops),
                        v(limits.write_iops)
                    ),
                )?;
                if let Some(w) = limits.weight {
                    self.set_v2_weight(&dir, dev, w)?;
                }
            }
        }
        Ok(())
    }

    /// cgroup2 weights live with a scheduling policy on the device: BFQ
    /// (`io.bfq.weight`) when it is the device's scheduler, else iocost
    /// (`io.weight`), which is off on every device until the root's
    /// `io.cost.qos` enables it; the kernel answers EOPNOTSUPP until then.
    fn set_v2_weight(&self, dir: &Path, dev: Device, weight: u32) -> Result<(), BlkioError> {
        let bfq = dir.join("io.bfq.weight");
        if dev.scheduler().as_deref() == Some("bfq") && bfq.exists() {
            return write(&bfq, &format!("{dev} {weight}"));
        }
        let file = dir.join("io.weight");
        let value = format!("{dev} {weight}");
        match fs::write(&file, &value) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let qos = self.root.join("io.cost.qos");
                if !qos.exists() {
                    return Err(BlkioError::Unsupported(format!(
                        "io.weight on {dev} needs iocost ({} does not exist: not the \
                         cgroup2 root, or a kernel without iocost) or the bfq scheduler \
                         on the device",
                        qos.display()
                    )));
                }
                write(&qos, &format!("{dev} enable=1"))?;
                // It changes how the whole device is shared, and stays.
                tracing::warn!(
                    device = %dev,
                    file = %qos.display(),
                    "iocost enabled on the device for io.weight (every cgroup on it is \
                     now scheduled by weight; `{dev} enable=0` there undoes it)"
                );
                write(&file, &value)
            }
            Err(source) => Err(BlkioError::Io { path: file, source }),
        }
    }

    /// Only the v1 write rate (weights turned into rates change it often).
    pub fn set_write_rate(
        &self,
        name: &str,
        dev: Device,
        bps: Option<u64>,
    ) -> Result<(), BlkioError> {
        let dir = self.cgroup_dir(name)?;
        write(
            &dir.join("blkio.throttle.write_bps_device"),
            &format!("{dev} {}", bps.unwrap_or(0)),
        )
    }

    /// Removes every limit of the group on the device (a vanished cgroup
    /// has nothing left to clear).
    pub fn clear(&self, name: &str, dev: Device) -> Result<(), BlkioError> {
        let Ok(dir) = self.cgroup_dir(name) else {
            return Ok(());
        };
        match self.mode {
            IoMode::V1Assisted => {
                for file in [
                    "blkio.throttle.write_bps_device",
                    "blkio.throttle.read_bps_device",
                    "blkio.throttle.write_iops_device",
                    "blkio.throttle.read_iops_device",
                ] {
                    write(&dir.join(file), &format!("{dev} 0"))?;
                }
                let weight = dir.join("blkio.bfq.weight_device");
                if weight.exists() {
                    // Back to the group default; ignored by kernels without
                    // a per-device entry.
                    let _ = fs::write(&weight, format!("{dev} 0"));
                }
            }
            IoMode::V2Kernel => {
                write(
                    &dir.join("io.max"),
                    &format!("{dev} rbps=max wbps=max riops=max wiops=max"),
                )?;
                for file in ["io.weight", "io.bfq.weight"] {
                    let weight = dir.join(file);
                    if weight.exists() {
                        // Ignored where the device has no per-device entry.
                        let _ = fs::write(&weight, format!("{dev} default"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Enables io and memory for `dir` in every ancestor up to the root.
    fn enable_v2_controllers(&self, dir: &Path) -> Result<(), BlkioError> {
        let Ok(rel) = dir.strip_prefix(&self.root) else {
            return Ok(());
        };
        let mut parent = self.root.clone();
        for part in rel.iter() {
            let control = parent.join("cgroup.subtree_control");
            let current = fs::read_to_string(&control).map_err(io_err(&control))?;
            for c in ["memory", "io"] {
                if !current.split_whitespace().any(|x| x == c) {
                    write(&control, &format!("+{c}"))?;
                }
            }
            parent.push(part);
        }
        Ok(())
    }

    /// Pauses or resumes every task of the group (v1 freezer / cgroup.freeze).
    /// Error when the group has no freezer cgroup of the same name.
    pub fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), BlkioError> {
        match (&self.freezer, self.mode) {
            (Some(freezer), _) => {
                let dir = freezer.join(name);
                if !dir.is_dir() {
                    return Err(BlkioError::NoCgroup {
                        cgroup: name.into(),
                        path: dir,
                    });
                }
                write(
                    &dir.join("freezer.state"),
                    if frozen { "FROZEN" } else { "THAWED" },
                )
            }
            (None, IoMode::V2Kernel) => write(
                &self.cgroup_dir(name)?.join("cgroup.freeze"),
                if frozen { "1" } else { "0" },
            ),
            (None, IoMode::V1Assisted) => Err(BlkioError::Unsupported(format!(
                "cannot pause the writers of '{name}': no v1 freezer hierarchy"
            ))),
        }
    }

    /// Moves one thread (of the daemon) into the group's blkio cgroup, so
    /// that the IO it issues is throttled and charged there (v1 only: v2
    /// does not place single threads outside threaded subtrees).
    pub fn place_thread(&self, name: &str, tid: i32) -> Result<(), BlkioError> {
        let tasks = self.cgroup_dir(name)?.join("tasks");
        write(&tasks, &tid.to_string())
    }

    /// Id of every cgroup in the io hierarchy (inode number → name), for
    /// naming the tracker's cgroups. The root is "/".
    pub fn cgroup_ids(&self) -> std::collections::HashMap<u64, String> {
        use std::os::unix::fs::MetadataExt;
        let mut out = std::collections::HashMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(meta) = fs::metadata(&dir) {
                let name = dir
                    .strip_prefix(&self.root)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                out.insert(meta.ino(), if name.is_empty() { "/".into() } else { name });
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn limits() -> IoLimits {
        IoLimits {
            write_bps: Some("10MiB".parse().unwrap()),
            read_iops: Some(300),
            weight: Some(50),
            ..IoLimits::default()
        }
    }

    #[test]
    fn v1_writes_throttle_files_and_clears_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("blkio/t/a");
        fs::create_dir_all(&dir).unwrap();
        let freezer = tmp.path().join("freezer");
        fs::create_dir_all(freezer.join("t/a")).unwrap();
        let b = Backend::fixture(
            IoMode::V1Assisted,
            &tmp.path().join("blkio"),
            Some(&freezer),
        );
        let dev = Device { major: 7, minor: 3 };
        b.apply("t/a", dev, &limits(), Some(10 << 20), Some(50))
            .unwrap();
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("blkio.throttle.write_bps_device"), "7:3 10485760");
        assert_eq!(read("blkio.throttle.read_bps_device"), "7:3 0");
        assert_eq!(read("blkio.throttle.read_iops_device"), "7:3 300");
        assert_eq!(read("blkio.bfq.weight_device"), "7:3 50");
        b.set_write_rate("t/a", dev, Some(123)).unwrap();
        assert_eq!(read("blkio.throttle.write_bps_device"), "7:3 123");
        b.clear("t/a", dev).unwrap();
        assert_eq!(read("blkio.throttle.write_bps_device"), "7:3 0");
        assert_eq!(read("blkio.throttle.read_iops_device"), "7:3 0");
        b.set_frozen("t/a", true).unwrap();
        assert_eq!(
            fs::read_to_string(freezer.join("t/a/freezer.state")).unwrap(),
            "FROZEN"
        );
        b.place_thread("t/a", 42).unwrap();
        assert_eq!(read("tasks"), "42");
        let e = b
            .apply("t/missing", dev, &limits(), None, None)
            .unwrap_err();
        assert!(e.to_string().contains("t/missing"), "{e}");
        assert!(b.set_frozen("t/missing", true).is_err());
        assert!(b.cgroup_ids().values().any(|n| n == "t/a"));
        // Clearing a vanished cgroup is not an error.
        b.clear("t/gone", dev).unwrap();
    }

    #[test]
    fn v2_writes_io_max_and_weight_and_enables_controllers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("t/a")).unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        fs::write(root.join("t/cgroup.subtree_control"), "").unwrap();
        let b = Backend::fixture(IoMode::V2Kernel, root, None);
        let dev = Device {
            major: 254,
            minor: 0,
        };
        b.apply("t/a", dev, &limits(), None, None).unwrap();
        let read = |f: &str| fs::read_to_string(root.join(f)).unwrap();
        assert_eq!(
            read("t/a/io.max"),
            "254:0 rbps=max wbps=10485760 riops=300 wiops=max"
        );
        assert_eq!(read("t/a/io.weight"), "254:0 50");
        // The fixture file keeps the last write: io was enabled after memory.
        assert_eq!(read("cgroup.subtree_control"), "+io");
        assert_eq!(read("t/cgroup.subtree_control"), "+io");
        b.clear("t/a", dev).unwrap();
        assert_eq!(
            read("t/a/io.max"),
            "254:0 rbps=max wbps=max riops=max wiops=max"
        );
        assert_eq!(read("t/a/io.weight"), "254:0 default");
        b.set_frozen("t/a", true).unwrap();
        assert_eq!(read("t/a/cgroup.freeze"), "1");
    }

    #[test]
    fn detects_the_mode_from_mounts() {
        let hybrid = Hierarchy::from_mountinfo(
            "30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
             31 25 0:27 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio\n\
             32 25 0:28 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n",
        )
        .unwrap();
        let b = Backend::detect(&hybrid).unwrap();
        assert_eq!(b.mode(), IoMode::V1Assisted);
        assert_eq!(b.root(), Path::new("/sys/fs/cgroup/blkio"));
    }
}
