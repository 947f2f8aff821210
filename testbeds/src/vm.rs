//! A second kernel for the tests: Debian's kernel package booted under qemu
//! (TCG; KVM guests hang on these hosts) with an initramfs that holds
//! busybox, the toolkit's binaries and test programs with the shared
//! libraries they need, the host tools the tests call (ip, tc, iperf3, ...)
//! and the kernel modules they need. The guest mounts a pure cgroup v2
//! hierarchy, runs a [`Suite`] of steps and prints a [`GuestReport`] on the
//! serial console; the host turns it into a per-kernel report.
//!
//! Host side: [`KernelPackage::fetch`], [`Staging`], [`boot`]. Guest side:
//! [`run_suite`].

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::run;

/// The console line that carries the guest's report (one JSON object).
pub const REPORT_MARKER: &str = "QOS-VM-REPORT ";

/// A Debian kernel image package, unpacked (not installed) in a cache.
#[derive(Debug, Clone)]
pub struct KernelPackage {
    pub package: String,
    /// `uname -r` of the kernel inside.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
    /// The unpacked package (`boot/`, `lib/modules/`).
    pub root: PathBuf,
}

/// The newest `linux-image-<series>.N-amd64` package apt knows about
/// (the plain flavour: not cloud, rt or dbg).
pub fn newest_kernel_package(series: &str) -> Result<String> {
    let prefix = format!("linux-image-{series}.");
    let names = run("apt-cache", &["pkgnames", &prefix])?;
    names
        .lines()
        .filter_map(|name| {
            let abi = name.strip_prefix(&prefix)?.strip_suffix("-amd64")?;
            let (patch, n) = abi.split_once('-')?;
            Some((patch.parse::<u32>().ok()?, n.parse::<u32>().ok()?, name))
        })
        .max()
        .map(|(_, _, name)| name.to_owned())
        .with_context(|| {
            format!("apt knows no {prefix}N-amd64 package (run apt-get update, or pass --kernel-package)")
        })
}

impl KernelPackage {
    /// Downloads and unpacks `package` under `cache` unless it is there,
    /// and builds its module index. Idempotent.
    pub fn fetch(cache: &Path, package: &str) -> Result<Self> {
        let dir = cache.join(package);
        let root = dir.join("root");
        let done = dir.join("unpacked");
        if !done.exists() {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let status = Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .status()
                .context("running apt-get download")?;
            if !status.success() {
                bail!("apt-get download {package} failed ({status})");
            }
            let deb = fs::read_dir(&dir)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
            let _ = fs::remove_dir_all(&root);
            run("dpkg-deb", &["-x", path_str(&deb)?, path_str(&root)?])?;
            fs::remove_file(&deb)?;
            fs::write(&done, package)?;
        }
        let boot = root.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .with_context(|| format!("reading {}", boot.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
        let release = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .context("vmlinuz name")?
            .to_owned();
        let modules = root.join("lib/modules").join(&release);
        if !modules.join("modules.dep").exists() {
            run("depmod", &["-b", path_str(&root)?, &release])?;
        }
        Ok(Self {
            package: package.to_owned(),
            release,
            vmlinuz,
            modules,
            root,
        })
    }

    /// Module files for `names` and their dependencies, in load order.
    pub fn modules_for(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        let mut seen = BTreeSet::new();
        let mut order = Vec::new();
        for name in names {
            let out = run(
                "modprobe",
                &[
                    "-d",
                    path_str(&self.root)?,
                    "-S",
                    &self.release,
                    "--show-depends",
                    name,
                ],
            )
            .with_context(|| format!("module {name} of kernel {}", self.release))?;
            for line in out.lines() {
                // "insmod /path/x.ko [params]"; built-ins print "builtin x".
                if let Some(path) = line.strip_prefix("insmod ") {
                    let path = path.split_whitespace().next().unwrap_or_default();
                    if seen.insert(path.to_owned()) {
                        order.push(PathBuf::from(path));
                    }
                }
            }
        }
        Ok(order)
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// The shared objects an executable loads (its interpreter included), as
/// `ldd` resolves them on this host. Static executables have none.
pub fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .with_context(|| format!("running ldd {}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(parse_ldd(&text))
}

/// Paths from `ldd` output: `name => /path (addr)` and `/path (addr)`.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let target = line.split_once("=>").map_or(line, |(_, t)| t.trim());
            let path = target.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The initramfs being assembled, in a directory.
#[derive(Debug)]
pub struct Staging {
    dir: tempfile::TempDir,
    files: BTreeSet<PathBuf>,
}

impl Staging {
    pub fn new(parent: &Path) -> Result<Self> {
        fs::create_dir_all(parent)?;
        let dir = tempfile::Builder::new()
            .prefix("initramfs-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
        Ok(Self {
            dir,
            files: BTreeSet::new(),
        })
    }

    /// Where `guest` lives in the staging directory, its parent created.
    fn target(&self, guest: &Path) -> Result<PathBuf> {
        let t = self
            .dir
            .path()
            .join(guest.strip_prefix("/").unwrap_or(guest));
        if let Some(parent) = t.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        Ok(t)
    }

    /// Writes `contents` at `guest` (an absolute path in the guest).
    pub fn write(&mut self, guest: &Path, contents: &[u8], mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let t = self.target(guest)?;
        fs::write(&t, contents).with_context(|| format!("writing {}", t.display()))?;
        fs::set_permissions(&t, fs::Permissions::from_mode(mode))?;
        self.files.insert(guest.to_owned());
        Ok(())
    }

    /// Copies a host file to `guest`, following symlinks.
    pub fn copy(&mut self, host: &Path, guest: &Path) -> Result<()> {
        if self.files.contains(guest) {
            return Ok(());
        }
        let t = self.target(guest)?;
        fs::copy(host, &t)
            .with_context(|| format!("copying {} into the initramfs", host.display()))?;
        self.files.insert(guest.to_owned());
        Ok(())
    }

    /// Copies an executable to the same path in the guest, without its
    /// debug information, with every shared library it needs.
    pub fn add_executable(&mut self, host: &Path) -> Result<()> {
        let host = std::path::absolute(host)?;
        if self.files.contains(&host) {
            return Ok(());
        }
        let t = self.target(&host)?;
        // Debug builds of the tests are mostly DWARF; the VM needs the code.
        let stripped = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&host)
            .arg(&t)
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            fs::copy(&host, &t).with_context(|| format!("copying {}", host.display()))?;
        }
        self.files.insert(host.clone());
        for lib in shared_libraries(&host)? {
            self.copy(&lib, &lib)?;
        }
        Ok(())
    }

    /// Finds `name` on this host's PATH (and the sbin directories) and adds
    /// it at the same path.
    pub fn add_tool(&mut self, name: &str) -> Result<PathBuf> {
        let path = which(name).with_context(|| format!("{name} is not installed on this host"))?;
        self.add_executable(&path)?;
        Ok(path)
    }

    /// Adds module files under /lib/modules with a `load-order` list.
    pub fn add_modules(&mut self, modules: &[PathBuf]) -> Result<()> {
        let mut order = String::new();
        for m in modules {
            let name = m.file_name().context("module path")?;
            self.copy(m, &Path::new("/lib/modules").join(name))?;
            order.push_str(&name.to_string_lossy());
            order.push('\n');
        }
        self.write(
            Path::new("/lib/modules/load-order"),
            order.as_bytes(),
            0o644,
        )
    }

    /// Writes the staged tree as a `newc` cpio archive (what the kernel
    /// unpacks as its initramfs).
    pub fn archive(&self, out: &Path) -> Result<u64> {
        let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut find = Command::new("find")
            .args([".", "-mindepth", "1"])
            .current_dir(self.dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .context("running find")?;
        let list = find.stdout.take().context("find stdout")?;
        let status = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet"])
            .current_dir(self.dir.path())
            .stdin(list)
            .stdout(file)
            .status()
            .context("running cpio (apt-get install cpio)")?;
        let listed = find.wait().context("waiting for find")?;
        if !listed.success() {
            bail!("find over {} failed ({listed})", self.dir.path().display());
        }
        if !status.success() {
            bail!("cpio into {} failed ({status})", out.display());
        }
        Ok(fs::metadata(out)?.len())
    }
}

/// `name` on PATH, or in the sbin directories a root shell has.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// How to boot the VM.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    /// Raw disk image handed to the guest as /dev/vda (virtio).
    pub disk: Option<PathBuf>,
    pub memory_mb: u64,
    pub cpus: u32,
    pub timeout: Duration,
    /// Every console line is appended here as it arrives.
    pub console_log: PathBuf,
}

/// What came back from a boot.
#[derive(Debug)]
pub struct BootOutcome {
    pub console: Vec<String>,
    pub timed_out: bool,
    /// The guest kernel's soft-lockup report that ended the boot: its
    /// vCPUs were stuck for [`LOCKUP_GIVE_UP_S`] or more, and it was killed.
    pub lockup: Option<String>,
    pub seconds: f64,
}

/// A guest whose vCPUs have been stuck this long is not coming back: the
/// lockups seen under TCG (guest kworkers during the IO steps, since
/// 2026-11-26) lasted until the VM was stopped.
pub const LOCKUP_GIVE_UP_S: u64 = 120;

/// Seconds stuck in a kernel line like
/// `watchdog: BUG: soft lockup - CPU#0 stuck for 164s! [kworker/0:2:364]`.
pub fn soft_lockup_seconds(line: &str) -> Option<u64> {
    let rest = line.split_once("BUG: soft lockup")?.1;
    let secs = rest.split_once("stuck for ")?.1.split_once("s!")?.0;
    secs.trim().parse().ok()
}

/// Boots the kernel under qemu (TCG), echoing the serial console to stdout
/// (prefixed) and the log, until the guest powers off or `timeout` passes
/// (then qemu is killed).
pub fn boot(spec: &BootSpec) -> Result<BootOutcome> {
    let qemu = which("qemu-system-x86_64")
        .context("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")?;
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-machine", "q35"])
        .args(["-m", &spec.memory_mb.to_string()])
        .args(["-smp", &spec.cpus.to_string()])
        .arg("-kernel")
        .arg(&spec.vmlinuz)
        .arg("-initrd")
        .arg(&spec.initramfs)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=4 psi=1 rdinit=/init",
        ])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-no-reboot", "-nic", "none"]);
    if let Some(disk) = &spec.disk {
        cmd.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,cache=unsafe",
            disk.display()
        ));
    }
    let mut child = crate::KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting qemu")?,
    );
    let stdout = child.0.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut log = fs::File::create(&spec.console_log)
        .with_context(|| format!("creating {}", spec.console_log.display()))?;
    let start = Instant::now();
    let deadline = start + spec.timeout;
    let mut console = Vec::new();
    let mut timed_out = false;
    let mut lockup = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if !line.starts_with(REPORT_MARKER) {
                    println!("vm| {line}");
                }
                let stuck = soft_lockup_seconds(&line).is_some_and(|s| s >= LOCKUP_GIVE_UP_S);
                if stuck {
                    lockup = Some(line.clone());
                }
                console.push(line);
                if stuck {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
        }
    }
    drop(child);
    Ok(BootOutcome {
        console,
        timed_out,
        lockup,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// One thing the guest runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub timeout_s: u64,
    /// The step prints a JSON document on stdout; keep it in the report.
    #[serde(default)]
    pub json_output: bool,
    /// Print the whole output on the console, even when the step passes
    /// (`scripts/net-fairness-vm` cuts the files its exec steps print out
    /// of the console log); otherwise a failed step's last lines.
    #[serde(default)]
    pub show_output: bool,
    /// Runs again after a failure (not after a timeout), this many times at
    /// most: for measurements on emulated CPUs, where a stall of the
    /// emulator now and then costs a run its figures. Every failed try is
    /// kept in the report.
    #[serde(default)]
    pub retries: u32,
}

/// The steps, in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Suite {
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    Passed,
    Failed,
    TimedOut,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    pub name: String,
    pub status: StepStatus,
    pub exit_code: Option<i32>,
    pub seconds: f64,
    /// The last lines of the output of a failed step or one that shows
    /// its output (all of it until `run_suite` has printed it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// Tries that failed before this result (see [`Step::retries`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_tries: Vec<FailedTry>,
}

/// A failed try of a step that was run again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedTry {
    pub exit_code: Option<i32>,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
}

/// What the guest prints after the suite.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestReport {
    pub kernel: String,
    pub uptime_at_start_s: f64,
    pub steps: Vec<StepResult>,
}

impl GuestReport {
    pub fn passed(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.status == StepStatus::Passed)
    }

    /// The report line in a console transcript.
    pub fn from_console(lines: &[String]) -> Option<Result<Self>> {
        lines.iter().rev().find_map(|l| {
            let json = l.split_once(REPORT_MARKER)?.1;
            Some(serde_json::from_str(json).context("parsing the guest report"))
        })
    }
}

const TAIL_LINES: usize = 150;

/// Guest side: runs every step with its timeout, prints progress and the
/// output of failed steps on the console, then the report line.
pub fn run_suite(suite: &Suite) -> GuestReport {
    let uptime = fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let mut steps = Vec::new();
    for step in &suite.steps {
        println!("qos-vm: step {} ...", step.name);
        let mut failed_tries = Vec::new();
        let mut r = loop {
            let mut r = run_step(step);
            println!(
                "qos-vm: step {}: {:?} in {:.1} s",
                r.name, r.status, r.seconds
            );
            // A step that shows its output prints all of it; a failed one
            // its last lines. The report (one console line) keeps those.
            r.output_tail = r.output_tail.map(|output| {
                let tail = last_lines(&output, TAIL_LINES);
                let shown = if step.show_output { &output } else { &tail };
                for line in shown.lines() {
                    println!("qos-vm: {} | {line}", r.name);
                }
                tail
            });
            if r.status != StepStatus::Failed || failed_tries.len() as u32 >= step.retries {
                break r;
            }
            println!(
                "qos-vm: step {} failed; running it again (try {} of {})",
                r.name,
                failed_tries.len() + 2,
                step.retries + 1
            );
            failed_tries.push(FailedTry {
                exit_code: r.exit_code,
                seconds: r.seconds,
                output_tail: r.output_tail,
            });
        };
        r.failed_tries = failed_tries;
        steps.push(r);
    }
    let report = GuestReport {
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        uptime_at_start_s: uptime,
        steps,
    };
    match serde_json::to_string(&report) {
        Ok(json) => println!("{REPORT_MARKER}{json}"),
        Err(e) => println!("qos-vm: cannot encode the report: {e}"),
    }
    report
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a step; its result's `output_tail` holds all the output of a step
/// that failed or shows its output (`run_suite` prints it and keeps the
/// tail).
fn run_step(step: &Step) -> StepResult {
    let start = Instant::now();
    let result = |status, exit_code, output_tail, json| StepResult {
        name: step.name.clone(),
        status,
        exit_code,
        seconds: start.elapsed().as_secs_f64(),
        output_tail,
        json,
        failed_tries: Vec::new(),
    };
    let Some((exe, args)) = step.argv.split_first() else {
        return result(StepStatus::Failed, None, Some("empty command".into()), None);
    };
    let spawned = Command::new(exe)
        .args(args)
        .envs(step.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return result(
                StepStatus::Failed,
                None,
                Some(format!("cannot start {exe}: {e}")),
                None,
            );
        }
    };
    let pid = child.id();
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let stdout = std::thread::spawn(move || read_all(out.as_mut()));
    let stderr = std::thread::spawn(move || read_all(err.as_mut()));
    let deadline = start + Duration::from_secs(step.timeout_s);
    let group = nix::unistd::Pid::from_raw(pid as i32);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break None,
        }
    };
    // Whatever the step left behind in its group (helpers holding the
    // output pipes would keep the readers below waiting forever).
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let json = step
        .json_output
        .then(|| serde_json::from_str(&stdout).ok())
        .flatten();
    let (st, code) = match status {
        Some(s) if s.success() => (StepStatus::Passed, s.code()),
        Some(s) => (StepStatus::Failed, s.code()),
        None => (StepStatus::TimedOut, None),
    };
    let output =
        (st != StepStatus::Passed || step.show_output).then(|| format!("{stdout}{stderr}"));
    result(st, code, output, json)
}

fn read_all(r: Option<&mut impl Read>) -> String {
    let mut s = Vec::new();
    if let Some(r) = r {
        let _ = r.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_and_interpreter_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                    \tlibmissing.so => not found\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn a_soft_lockup_line_gives_the_seconds_stuck() {
        assert_eq!(
            soft_lockup_seconds(
                "[  301.239556] watchdog: BUG: soft lockup - CPU#0 stuck for 164s! [kworker/0:2:364]"
            ),
            Some(164)
        );
        assert_eq!(
            soft_lockup_seconds("rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"),
            None
        );
        assert_eq!(
            soft_lockup_seconds("qos-vm: step test enforce: stuck for 9s! (a test's own output)"),
            None
        );
    }

    #[test]
    fn the_report_is_found_in_a_console_transcript() {
        let report = GuestReport {
            kernel: "6.1.0-48-amd64".into(),
            uptime_at_start_s: 2.5,
            steps: vec![StepResult {
                name: "probe".into(),
                status: StepStatus::Passed,
                exit_code: Some(0),
                seconds: 1.0,
                output_tail: None,
                json: None,
                failed_tries: Vec::new(),
            }],
        };
        let lines = vec![
            "[    1.0] booting".to_owned(),
            format!("{REPORT_MARKER}{}", serde_json::to_string(&report).unwrap()),
            "qos-vm: suite exited".to_owned(),
        ];
        let parsed = GuestReport::from_console(&lines).unwrap().unwrap();
        assert_eq!(parsed.kernel, "6.1.0-48-amd64");
        assert!(parsed.passed());
        assert!(GuestReport::from_console(&lines[..1]).is_none());
        let broken = vec![format!("{REPORT_MARKER}{{\"kernel\":")];
        assert!(GuestReport::from_console(&broken).unwrap().is_err());
        let mut failed = parsed.clone();
        failed.steps[0].status = StepStatus::TimedOut;
        assert!(!failed.passed());
    }

    #[test]
    fn a_failed_step_runs_again_up_to_its_retries() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("tried");
        // Fails the first time only.
        let flaky = format!(
            "test -e {0} || {{ touch {0}; echo first; exit 3; }}",
            marker.display()
        );
        let step = |name: &str, cmd: &str, retries| Step {
            name: name.into(),
            argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            env: Vec::new(),
            timeout_s: 30,
            json_output: false,
            show_output: false,
            retries,
        };
        let suite = Suite {
            steps: vec![
                step("flaky", &flaky, 1),
                step("broken", "exit 4", 2),
                step("once", "exit 5", 0),
            ],
        };
        let report = run_suite(&suite);
        let flaky = &report.steps[0];
        assert_eq!(flaky.status, StepStatus::Passed);
        assert_eq!(flaky.failed_tries.len(), 1);
        assert_eq!(flaky.failed_tries[0].exit_code, Some(3));
        assert!(
            flaky.failed_tries[0]
                .output_tail
                .as_deref()
                .is_some_and(|t| t.contains("first"))
        );
        let broken = &report.steps[1];
        assert_eq!(broken.status, StepStatus::Failed);
        assert_eq!(broken.exit_code, Some(4));
        assert_eq!(broken.failed_tries.len(), 2);
        assert_eq!(report.steps[2].failed_tries.len(), 0);
        assert!(!report.passed());
    }
}
