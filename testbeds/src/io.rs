//! IO testbeds: file-backed loop devices with a filesystem, and cgroups in
//! every hierarchy an IO test needs (io, freezer, cgroup2), all removed on
//! drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{kill_and_remove, run, unique};

/// A loop device over a sparse file, with a filesystem mounted on it.
/// Unmounted, detached and deleted on drop.
#[derive(Debug)]
pub struct LoopFs {
    /// Image and mount point; deleted after `drop` has unmounted.
    _dir: tempfile::TempDir,
    device: String,
    mount: PathBuf,
    major: u32,
    minor: u32,
    /// Still mounted and attached.
    attached: bool,
}

impl LoopFs {
    /// `fs` is `ext4` or `xfs`; `direct_io` makes the loop device bypass
    /// the backing file's page cache (so the device, not memory, is what
    /// the writers saturate).
    pub fn new(fs: &str, size_mb: u64, direct_io: bool) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("qos-io-").tempdir_in(
            std::env::var_os("QOS_IO_DIR").map_or_else(std::env::temp_dir, PathBuf::from),
        )?;
        let image = dir.path().join("disk.img");
        let f = std::fs::File::create(&image)?;
        f.set_len(size_mb << 20)?;
        drop(f);
        let image = image.to_str().context("temp dir path is not UTF-8")?;
        let direct = if direct_io {
            "--direct-io=on"
        } else {
            "--direct-io=off"
        };
        let device = run("losetup", &["-f", "--show", direct, image])?
            .trim()
            .to_owned();
        let mount = dir.path().join("mnt");
        let mut me = Self {
            _dir: dir,
            device,
            mount,
            major: 0,
            minor: 0,
            attached: true,
        };
        let mkfs = match fs {
            "ext4" => run("mkfs.ext4", &["-q", "-F", &me.device]),
            "xfs" => run("mkfs.xfs", &["-q", "-f", &me.device]),
            other => bail!("unknown filesystem '{other}' (ext4 or xfs)"),
        };
        mkfs?;
        std::fs::create_dir_all(&me.mount)?;
        let mount = me.mount.to_str().context("temp dir path is not UTF-8")?;
        run("mount", &[&me.device, mount])?;
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&me.device)?.rdev();
        me.major = nix::sys::stat::major(rdev) as u32;
        me.minor = nix::sys::stat::minor(rdev) as u32;
        Ok(me)
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// `major:minor`.
    pub fn devno(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Selects the device's IO scheduler (`none`, `bfq`, `mq-deadline`).
    pub fn set_scheduler(&self, scheduler: &str) -> Result<()> {
        let name = self.device.trim_start_matches("/dev/");
        let p = format!("/sys/block/{name}/queue/scheduler");
        std::fs::write(&p, scheduler).with_context(|| format!("writing {scheduler} to {p}"))
    }

    /// The IO schedulers this kernel offers for the device (`none`,
    /// `mq-deadline`, ...; `bfq` only where the kernel was built with it).
    pub fn schedulers(&self) -> Result<Vec<String>> {
        let name = self.device.trim_start_matches("/dev/");
        let p = format!("/sys/block/{name}/queue/scheduler");
        let list = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
        Ok(list
            .split_whitespace()
            .map(|s| s.trim_matches(['[', ']']).to_owned())
            .collect())
    }

    /// Bytes written to the device so far (sectors from /sys/block/X/stat).
    pub fn written_bytes(&self) -> u64 {
        let name = self.device.trim_start_matches("/dev/");
        std::fs::read_to_string(format!("/sys/block/{name}/stat"))
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .nth(6)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map_or(0, |sectors| sectors * 512)
    }
}

impl LoopFs {
    /// Unmounts and detaches the device, then deletes the loop device itself
    /// (`LOOP_CTL_REMOVE`): a disk that goes away, its node and
    /// `/sys/dev/block` entry with it.
    pub fn remove_device(&mut self) -> Result<()> {
        let mount = self.mount.display().to_string();
        if !crate::wait_for(Duration::from_secs(10), || {
            run("umount", &[mount.as_str()]).is_ok()
        }) {
            bail!(
                "{mount} stays busy: {}",
                run("fuser", &["-vm", mount.as_str()]).unwrap_or_default()
            );
        }
        self.detach();
        // LOOP_CTL_REMOVE from <linux/loop.h>.
        const LOOP_CTL_REMOVE: nix::libc::c_ulong = 0x4C81;
        let ctl = std::fs::File::open("/dev/loop-control").context("opening /dev/loop-control")?;
        // The device may still be busy for a moment after the lazy unmount.
        let removed = crate::wait_for(Duration::from_secs(5), || {
            use std::os::fd::AsRawFd;
            // SAFETY: LOOP_CTL_REMOVE takes the minor number by value and
            // touches no memory of ours.
            unsafe {
                nix::libc::ioctl(
                    ctl.as_raw_fd(),
                    LOOP_CTL_REMOVE,
                    self.minor as nix::libc::c_ulong,
                ) == 0
            }
        });
        if !removed {
            bail!(
                "{} could not be removed: {}",
                self.device,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    fn detach(&mut self) {
        if std::mem::take(&mut self.attached) {
            let quiet = |c: &mut Command| {
                let _ = c
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            };
            quiet(Command::new("umount").arg("-l").arg(&self.mount));
            quiet(Command::new("losetup").arg("-d").arg(&self.device));
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A test cgroup of the same name in the io hierarchy (v1 blkio or
/// cgroup2), the v1 freezer and cgroup2. Thawed, emptied and removed on drop.
#[derive(Debug)]
pub struct IoCgroup {
    name: String,
    roots: Vec<PathBuf>,
    freezer: Option<PathBuf>,
}

impl IoCgroup {
    pub fn new(prefix: &str) -> Result<Self> {
        let h = qos_core::Hierarchy::detect()?;
        let mut roots = vec![h.controller_root("blkio")?.to_owned()];
        let freezer = h.v1_mount("freezer").map(Path::to_owned);
        roots.extend(freezer.clone());
        if let Ok(u) = h.unified_root()
            && !roots.iter().any(|r| r == u)
        {
            roots.push(u.to_owned());
        }
        let cg = Self {
            name: unique(prefix),
            roots,
            freezer,
        };
        for r in &cg.roots {
            let d = r.join(&cg.name);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(cg)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Directory in the io hierarchy.
    pub fn io_dir(&self) -> &PathBuf {
        &self.roots[0]
    }

    /// Spawns `cmd` inside this cgroup in every hierarchy.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        let procs: Vec<PathBuf> = self
            .roots
            .iter()
            .map(|r| r.join(&self.name).join("cgroup.procs"))
            .collect();
        crate::spawn_in(&procs, None, cmd)
    }

    /// Whether its tasks are frozen (v1 freezer, else cgroup2 freeze).
    pub fn frozen(&self) -> bool {
        match &self.freezer {
            Some(f) => std::fs::read_to_string(f.join(&self.name).join("freezer.state"))
                .is_ok_and(|s| s.trim() != "THAWED"),
            None => self
                .roots
                .iter()
                .filter_map(|r| {
                    std::fs::read_to_string(r.join(&self.name).join("cgroup.freeze")).ok()
                })
                .any(|s| s.trim() == "1"),
        }
    }

    /// Lifts every IO throttle set on it (the toolkit's own
    /// `Backend::clear`, for each device its io files list), so that IO its
    /// dying tasks still have in flight completes at the device's speed. A
    /// direct writer killed with a queue of asynchronous writes waits in
    /// `exit_aio` for all of them: at a test's few MiB/s that took longer
    /// than the removal waits, and the io-fairness runs without qosd (whose
    /// limits nobody clears) left a cgroup behind every time.
    fn lift_io_throttles(&self) {
        let Ok(h) = qos_core::Hierarchy::detect() else {
            return;
        };
        let Ok(backend) = blkio::Backend::detect(&h) else {
            return;
        };
        let dir = self.roots[0].join(&self.name);
        let mut devices: Vec<blkio::Device> = [
            "blkio.throttle.read_bps_device",
            "blkio.throttle.write_bps_device",
            "blkio.throttle.read_iops_device",
            "blkio.throttle.write_iops_device",
            "io.max",
        ]
        .iter()
        .flat_map(|f| devices_listed(&dir.join(f)))
        .collect();
        devices.sort();
        devices.dedup();
        for dev in devices {
            let _ = backend.clear(&self.name, dev);
        }
    }

    /// Reads a file of this cgroup in the io hierarchy.
    pub fn read(&self, file: &str) -> Result<String> {
        let p = self.roots[0].join(&self.name).join(file);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }
}

/// The devices a per-device cgroup file (`blkio.throttle.*_device`,
/// `io.max`) has a line for; none when it cannot be read.
fn devices_listed(path: &Path) -> Vec<blkio::Device> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|d| blkio::Device::parse(d).ok())
        .collect()
}

impl Drop for IoCgroup {
    fn drop(&mut self) {
        if let Some(f) = &self.freezer {
            let _ = std::fs::write(f.join(&self.name).join("freezer.state"), "THAWED");
        }
        self.lift_io_throttles();
        for r in &self.roots {
            kill_and_remove(&r.join(&self.name));
        }
    }
}

/// A `dd` writing `mb` MiB of zeros to `path` (buffered unless `direct`).
pub fn dd(path: &Path, mb: u64, direct: bool) -> Command {
    let mut c = Command::new("dd");
    c.arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .arg("bs=1M")
        .arg(format!("count={mb}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if direct {
        c.arg("oflag=direct");
    }
    c
}

/// The rate of a byte counter sampled over time, `(seconds, bytes)` in time
/// order, measured between its first and its last increase.
///
/// Throttled writeback reaches the block layer in chunks (up to 8 MiB on
/// cgroup2 at a few MiB/s): a fixed window holds one chunk more or less
/// than the rate, i.e. an error of up to a chunk over the window. Between
/// the first and last arrivals it holds exactly the chunks that the limit
/// paid for over that time. Falls back to the whole window when fewer
/// than two increases were seen; `None` for fewer than two samples.
pub fn paced_rate(samples: &[(f64, u64)]) -> Option<f64> {
    let (first, last) = (samples.first()?, samples.last()?);
    if samples.len() < 2 || last.0 <= first.0 {
        return None;
    }
    let arrivals: Vec<&(f64, u64)> = samples
        .windows(2)
        .filter(|w| w[1].1 > w[0].1)
        .map(|w| &w[1])
        .collect();
    match (arrivals.first(), arrivals.last()) {
        (Some(a), Some(b)) if arrivals.len() >= 2 && b.0 > a.0 => {
            Some(b.1.saturating_sub(a.1) as f64 / (b.0 - a.0))
        }
        _ => Some(last.1.saturating_sub(first.1) as f64 / (last.0 - first.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::{devices_listed, paced_rate};

    #[test]
    fn per_device_files_name_their_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v1 = dir.path().join("blkio.throttle.write_bps_device");
        std::fs::write(&v1, "7:0 5242880\n8:16 100\n").expect("write");
        let named = |p| {
            devices_listed(p)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(named(&v1), ["7:0", "8:16"]);
        let v2 = dir.path().join("io.max");
        std::fs::write(&v2, "7:0 rbps=max wbps=5242880 riops=max wiops=max\n").expect("write");
        assert_eq!(named(&v2), ["7:0"]);
        std::fs::write(&v2, "").expect("write");
        assert!(devices_listed(&v2).is_empty());
        assert!(devices_listed(&dir.path().join("absent")).is_empty());
    }

    /// Samples every `dt` seconds of a counter that gains `chunk` bytes
    /// every `period` seconds, the first arrival at `phase`.
    fn chunked(chunk: u64, period: f64, phase: f64, dt: f64, seconds: f64) -> Vec<(f64, u64)> {
        let steps = (seconds / dt).round() as usize;
        (0..=steps)
            .map(|i| {
                let t = i as f64 * dt;
                let n = if t < phase {
                    0
                } else {
                    ((t - phase) / period).floor() as u64 + 1
                };
                (t, n * chunk)
            })
            .collect()
    }

    #[test]
    fn chunked_counter_gives_its_rate_whatever_the_phase() {
        // 8 MiB every 1.6 s = 5 MiB/s; a fixed 15 s window sees 9 or 10
        // chunks (4.8 or 5.33 MiB/s).
        let mib = 1u64 << 20;
        let mut worst_window_error = 0.0f64;
        for phase in [0.05, 0.4, 0.8, 1.2, 1.55] {
            let s = chunked(8 * mib, 1.6, phase, 0.1, 15.0);
            let whole = (s.last().unwrap().1 - s[0].1) as f64 / 15.0 / mib as f64;
            worst_window_error = worst_window_error.max((whole - 5.0).abs() / 5.0);
            let paced = paced_rate(&s).unwrap() / mib as f64;
            assert!((paced - 5.0).abs() < 0.1, "phase {phase}: {paced}");
        }
        // What the fixed window would have reported at some phase.
        assert!(worst_window_error > 0.05, "{worst_window_error}");
    }

    #[test]
    fn continuous_counter_gives_the_window_mean() {
        let s: Vec<(f64, u64)> = (0..=30).map(|i| (i as f64 * 0.1, i * 1000)).collect();
        let r = paced_rate(&s).unwrap();
        assert!((r - 10_000.0).abs() < 1.0, "{r}");
    }

    #[test]
    fn too_few_arrivals_fall_back_to_the_window() {
        assert_eq!(paced_rate(&[]), None);
        assert_eq!(paced_rate(&[(0.0, 5)]), None);
        assert_eq!(paced_rate(&[(0.0, 0), (2.0, 0)]), Some(0.0));
        // One arrival: bytes over the window.
        assert_eq!(paced_rate(&[(0.0, 0), (1.0, 10), (2.0, 10)]), Some(5.0));
        // Time must move.
        assert_eq!(paced_rate(&[(1.0, 0), (1.0, 10)]), None);
    }
}
