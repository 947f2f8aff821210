//! Self-cleaning testbeds: network namespaces, veth pairs, cgroup2
//! directories, sysctls, processes placed in cgroups and namespaces.
//!
//! Every resource is a guard that removes what it created when dropped, also
//! when a test fails (panics unwind through the guards). Names are unique per
//! run (`unique`), so parallel runs cannot collide.

pub mod daemon;
pub mod fairness;
pub mod fuzz;
pub mod io;
pub mod iperf;
pub mod mem;
pub mod memload;
pub mod net;
pub mod plot;
pub mod rr;
pub mod sockdiag;
pub mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A short name unique to this process and call: `<prefix><6 hex>`, kept
/// within the 15 characters an interface name may have.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let seed = std::process::id() ^ (n.wrapping_mul(0x9e37_79b9)) ^ nanos_now();
    let name = format!("{prefix}{:06x}", seed & 0xff_ffff);
    name.chars().take(15).collect()
}

fn nanos_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// Whether this process may build testbeds. Without root: under CI this
/// panics (a privileged test must not pass by skipping); elsewhere it says so
/// on stderr and returns false so the caller can skip.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root and CI is set: refusing to skip");
    }
    eprintln!("SKIPPED {test}: needs root (run the tests as root, e.g. scripts/test)");
    false
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Result<String> {
    let cmd = cmd.as_ref();
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", cmd.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}",
            cmd.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive but not its name.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A veth pair whose host end lives in the current namespace; the peer is
/// moved into `peer_ns`. Deleting the host end deletes both.
#[derive(Debug)]
pub struct Veth {
    host: String,
    peer: String,
}

impl Veth {
    pub fn new(host: &str, peer: &str, peer_ns: &Netns) -> Result<Self> {
        run(
            "ip",
            &[
                "link",
                "add",
                host,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                peer_ns.name(),
            ],
        )?;
        let v = Self {
            host: host.to_owned(),
            peer: peer.to_owned(),
        };
        run("ip", &["link", "set", host, "up"])?;
        peer_ns.ip(&["link", "set", peer, "up"])?;
        // A veth hands each packet to the backlog of the CPU that sent it.
        // The link's qdisc upstream (tbf) dequeues on whichever CPU runs it,
        // so one flow's packets reach two CPUs' backlogs and overtake each
        // other: reordering, spurious retransmissions, congestion windows
        // cut. A NIC's RSS keeps a flow on one CPU; RPS over all CPUs does
        // the same here.
        let mask = cpu_mask(
            &std::fs::read_to_string(CPUS_ONLINE)
                .with_context(|| format!("reading {CPUS_ONLINE}"))?,
        )?;
        let steer = format!(
            "for q in /sys/class/net/\"$0\"/queues/rx-*; do echo {mask} > \"$q/rps_cpus\" || exit 1; done"
        );
        run("sh", &["-c", &steer, host])
            .with_context(|| format!("RPS (CONFIG_RPS) on the veth {host}"))?;
        peer_ns.exec("sh", &["-c", &steer, peer]).with_context(|| {
            format!("RPS (CONFIG_RPS) on the veth {peer} in {}", peer_ns.name())
        })?;
        Ok(v)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Name of the end in the peer namespace.
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.host]);
    }
}

const CPUS_ONLINE: &str = "/sys/devices/system/cpu/online";

/// The hex CPU mask (`rps_cpus` format: 32-bit words, highest first, split
/// by commas) of a CPU list such as `0-3,8,10-11` (`/sys/.../cpu/online`).
pub fn cpu_mask(list: &str) -> Result<String> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let bad = || format!("bad CPU list {list:?}: {part:?}");
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let lo: usize = lo.parse().with_context(bad)?;
        let hi: usize = hi.parse().with_context(bad)?;
        if lo > hi || hi >= 8192 {
            bail!(bad());
        }
        cpus.extend(lo..=hi);
    }
    let words = cpus.iter().max().map_or(0, |m| m / 32 + 1);
    let mut mask = vec![0u32; words];
    for c in cpus {
        mask[c / 32] |= 1 << (c % 32);
    }
    let text: Vec<String> = mask.iter().rev().map(|w| format!("{w:08x}")).collect();
    Ok(text.join(","))
}

/// A sysctl set for the test and restored on drop.
#[derive(Debug)]
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    pub fn set(key: &str, value: &str) -> Result<Self> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let old = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            path,
            old: old.trim().to_owned(),
        })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}

/// The cgroup2 mount of this host.
pub fn cgroup2_root() -> Result<PathBuf> {
    let h = qos_core::Hierarchy::detect()?;
    Ok(h.unified_root()?.to_owned())
}

/// A cgroup2 directory created for a test. On drop its processes are killed
/// and it (with any sub-cgroups) is removed.
#[derive(Debug)]
pub struct CgroupDir {
    path: PathBuf,
}

impl CgroupDir {
    /// Creates `<cgroup2 root>/<unique name>`.
    pub fn new(prefix: &str) -> Result<Self> {
        let path = cgroup2_root()?.join(unique(prefix));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// Creates a child (removed with the parent).
    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Name relative to the cgroup2 root.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Name of the child `child` relative to the cgroup2 root.
    pub fn child_name(&self, child: &str) -> String {
        format!("{}/{child}", self.name())
    }
}

pub(crate) fn kill_and_remove(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_and_remove(&e.path());
            }
        }
    }
    for _ in 0..100 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        // v1 lists a process whose single thread sits in the group (the
        // toolkit's flush helper does): never kill the test itself.
        let me = std::process::id() as i32;
        for p in pids.iter().filter(|p| **p != me) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        kill_and_remove(&self.path);
    }
}

/// Where a spawned process runs.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// cgroup2 directory to join before exec.
    pub cgroup: Option<PathBuf>,
    /// Network namespace to enter before exec.
    pub netns: Option<PathBuf>,
}

/// Spawns `cmd` placed in a cgroup and/or network namespace.
pub fn spawn(place: &Placement, cmd: &mut Command) -> Result<Child> {
    let procs: Vec<PathBuf> = place
        .cgroup
        .iter()
        .map(|c| c.join("cgroup.procs"))
        .collect();
    spawn_in(&procs, place.netns.as_deref(), cmd)
}

/// Spawns `cmd` after writing its pid to each `cgroup.procs` file and
/// entering the network namespace, if any.
pub fn spawn_in(
    cgroup_procs: &[PathBuf],
    netns: Option<&Path>,
    cmd: &mut Command,
) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let cgroup_procs = cgroup_procs.to_vec();
    let netns = netns.map(Path::to_owned);
    // SAFETY: the closure runs between fork and exec; it only opens files,
    // writes to them and calls setns.
    unsafe {
        cmd.pre_exec(move || {
            for p in &cgroup_procs {
                std::fs::write(p, b"0")?;
            }
            if let Some(ns) = &netns {
                let f = std::fs::File::open(ns)?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Waits up to `timeout` for the process to exit; `what` names it in
    /// the error.
    pub fn wait_exit(&mut self, timeout: Duration, what: &str) -> Result<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.0.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > end {
                bail!("{what} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_mask;

    #[test]
    fn cpu_masks_from_cpu_lists() {
        assert_eq!(cpu_mask("0-1\n").unwrap(), "00000003");
        assert_eq!(cpu_mask("0").unwrap(), "00000001");
        assert_eq!(cpu_mask("0-3,8,10-11").unwrap(), "00000d0f");
        assert_eq!(cpu_mask("0,33").unwrap(), "00000002,00000001");
        assert_eq!(cpu_mask("0-63").unwrap(), "ffffffff,ffffffff");
        for bad in ["", "a", "3-1", "0-", "1,,2", "9000"] {
            assert!(cpu_mask(bad).is_err(), "{bad:?} accepted");
        }
    }
}
