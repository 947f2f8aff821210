//! io-fairness: per-cgroup disk IO limits and weights for buffered and
//! direct writers, with the toolkit ("qosd": the `blkio` controller qosd
//! runs) and without it ("kernel-only": the same limits written to the
//! kernel's v1 blkio files, weights to BFQ), side by side in one run on loop
//! devices this script creates (ext4 and xfs).
//!
//! Per cgroup, at the block layer: bytes the writeback tracker attributes
//! to the cgroup that dirtied them, written back or direct. `mean_bps` (and
//! `ratio`) is the rate between the group's first and last arrivals in the
//! run, sampled every 100 ms (throttled writeback arrives in chunks of up
//! to 8 MiB; `window_mean_bps` is the plain mean over the run's one-second
//! windows, `cv` their variation). As the writers see it (`writer_*`,
//! `writer_ratio`): bytes passed to write(), plus dirtied pages for mmap
//! writers; without control buffered writers run at page-cache speed and
//! the block layer may see nothing of them within the run. `leaked_bytes`
//! are bytes of the group's pages the kernel charged to another cgroup. Writes `results/io-fairness/<case>.json`
//! and `.png` and prints a table.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use blkio::{
    Backend, Device, IoControl, IoLimits, IoMode, Tracker,
    controller::{IoSettings, run_loop},
};
use clap::Parser;
use serde_json::{Value, json};
use testbeds::{
    io::{IoCgroup, LoopFs},
    plot::{Line, rate_panels},
};

const MIB: u64 = 1 << 20;
const CASES: [&str; 7] = [
    "throttle",
    "weight",
    "mixed",
    "shared-file",
    "mmap",
    "fsync",
    "overhead",
];

#[derive(Parser, Debug)]
#[command(about = "Disk IO isolation with and without the toolkit, side by side")]
struct Args {
    /// Case to run (repeatable): throttle, weight, mixed, shared-file, mmap,
    /// fsync, overhead. Default: all.
    #[arg(long = "case", value_parser = clap::builder::PossibleValuesParser::new(CASES))]
    cases: Vec<String>,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(2..=600))]
    duration: u64,
    /// Filesystems (repeatable): ext4, xfs. Default: both for throttle and
    /// weight, ext4 for the other cases.
    #[arg(long = "fs", value_parser = ["ext4", "xfs"])]
    filesystems: Vec<String>,
    /// Writers (repeatable): buffered, direct. Default: both for throttle
    /// and weight, buffered for the other cases.
    #[arg(long = "writer", value_parser = ["buffered", "direct"])]
    writers: Vec<String>,
    /// Write JSON only (no PNG).
    #[arg(long)]
    json_only: bool,
    #[arg(long, default_value = "results/io-fairness")]
    out: PathBuf,
    /// Exit non-zero when a qosd run misses its target (CI-sized
    /// tolerances: ratio within 10 %, 20 % for weights, leaks ≤ 2 %,
    /// attribution ≥ 99 %).
    #[arg(long)]
    assert: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Qosd,
    KernelOnly,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Qosd => "qosd",
            Self::KernelOnly => "kernel-only",
        }
    }
}

/// One writer process of a group.
#[derive(Clone, Debug)]
struct Job {
    file: &'static str,
    direct: bool,
    mmap: bool,
    fsync_every: Option<u32>,
    /// Offset and size in the file, MiB.
    span: (u64, u64),
}

impl Job {
    fn plain(file: &'static str, direct: bool) -> Self {
        Self {
            file,
            direct,
            mmap: false,
            fsync_every: None,
            span: (0, 256),
        }
    }

    /// Allocates the job's span of its file before the run, so that fio
    /// finds it laid out (otherwise a slow group spends its run laying out).
    /// From inside the group: on cgroup2 an inode's writeback belongs to the
    /// cgroup that first dirtied it, and fallocate dirties the inode.
    fn prepare(&self, dir: &Path, group: &IoCgroup) -> Result<()> {
        let path = dir.join(self.file);
        let mut cmd = Command::new("fallocate");
        cmd.arg("-o")
            .arg(format!("{}MiB", self.span.0))
            .arg("-l")
            .arg(format!("{}MiB", self.span.1))
            .arg(&path);
        let status = group
            .spawn(&mut cmd)?
            .wait()
            .with_context(|| format!("allocating {}", path.display()))?;
        if !status.success() {
            bail!("fallocate {} failed ({status})", path.display());
        }
        Ok(())
    }

    fn command(&self, dir: &Path, seconds: u64) -> Command {
        let mut c = Command::new("fio");
        c.arg("--name=w")
            .arg(format!("--filename={}", dir.join(self.file).display()))
            // invalidate=0: fio's default fadvise(DONTNEED) before each pass
            // would start writeback from the writer itself.
            .args([
                "--rw=write",
                "--bs=1M",
                "--time_based",
                "--minimal",
                "--invalidate=0",
            ])
            .arg(format!("--runtime={seconds}"))
            .arg(format!("--offset={}M", self.span.0))
            .arg(format!("--size={}M", self.span.1))
            .arg(format!("--direct={}", u8::from(self.direct)))
            // Direct writers keep a queue (the device, not one writer's
            // latency, must be the limit for weights to mean anything).
            .arg(format!(
                "--ioengine={}",
                if self.mmap {
                    "mmap"
                } else if self.direct {
                    "libaio"
                } else {
                    "psync"
                }
            ))
            .arg(format!("--iodepth={}", if self.direct { 16 } else { 1 }))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(n) = self.fsync_every {
            c.arg(format!("--fsync={n}"));
        }
        c
    }
}

#[derive(Clone, Debug)]
struct GroupSpec {
    label: &'static str,
    write_bps: Option<u64>,
    weight: Option<u32>,
    jobs: Vec<Job>,
}

impl GroupSpec {
    fn limits(&self) -> IoLimits {
        IoLimits {
            write_bps: self
                .write_bps
                .and_then(|b| blkio::ByteRate::from_bytes_per_sec(b).ok()),
            weight: self.weight,
            ..IoLimits::default()
        }
    }
}

/// The two groups of a case (A is the smaller share) and the ratio A/B the
/// limits or weights call for.
fn case_groups(case: &str, direct: bool) -> (Vec<GroupSpec>, f64) {
    let g = |label, write_bps: Option<u64>, weight, jobs| GroupSpec {
        label,
        write_bps,
        weight,
        jobs,
    };
    match case {
        // The source's 50k vs 200k, in MiB/s: the device does several
        // times more, so the limits (not the device) bind.
        "throttle" => (
            vec![
                g("a", Some(5 * MIB), None, vec![Job::plain("a.bin", direct)]),
                g("b", Some(20 * MIB), None, vec![Job::plain("b.bin", direct)]),
            ],
            0.25,
        ),
        // The source's 10 % vs 60 %: the device is the limit, shared 1:6.
        "weight" => (
            vec![
                g("a", None, Some(100), vec![Job::plain("a.bin", direct)]),
                g("b", None, Some(600), vec![Job::plain("b.bin", direct)]),
            ],
            100.0 / 600.0,
        ),
        "mixed" => (
            vec![
                g(
                    "a",
                    Some(5 * MIB),
                    None,
                    vec![Job::plain("a1.bin", false), Job::plain("a2.bin", true)],
                ),
                g("b", Some(20 * MIB), None, vec![Job::plain("b.bin", false)]),
            ],
            0.25,
        ),
        "shared-file" => {
            let part = |offset| Job {
                span: (offset, 128),
                ..Job::plain("shared.bin", false)
            };
            (
                vec![
                    g("a", Some(5 * MIB), None, vec![part(0)]),
                    g("b", Some(20 * MIB), None, vec![part(128)]),
                ],
                0.25,
            )
        }
        "mmap" => (
            vec![
                g(
                    "a",
                    Some(5 * MIB),
                    None,
                    vec![Job {
                        mmap: true,
                        ..Job::plain("a.bin", false)
                    }],
                ),
                g("b", Some(20 * MIB), None, vec![Job::plain("b.bin", false)]),
            ],
            0.25,
        ),
        "fsync" => (
            vec![
                g(
                    "a",
                    Some(5 * MIB),
                    None,
                    vec![Job {
                        fsync_every: Some(4),
                        ..Job::plain("a.bin", false)
                    }],
                ),
                g("b", Some(20 * MIB), None, vec![Job::plain("b.bin", false)]),
            ],
            0.25,
        ),
        _ => (Vec::new(), 1.0),
    }
}

fn mean_cv(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, if mean > 0.0 { var.sqrt() / mean } else { 0.0 })
}

struct RunResult {
    json: Value,
    series: Vec<Line>,
}

/// Why a kernel-only weight run has no figures on some kernels.
const NO_BFQ: &str = "this kernel has no BFQ scheduler (CONFIG_IOSCHED_BFQ), the only weight \
                      mechanism v1 blkio has: no kernel-only weight anchor";

fn run_one(case: &str, fs: &str, direct: bool, mode: Mode, seconds: u64) -> Result<RunResult> {
    let (specs, expected) = case_groups(case, direct);
    let disk = LoopFs::new(fs, 1024, true).context("loop device")?;
    let dev = Device::parse(&disk.devno())?;
    let weights = specs.iter().any(|s| s.weight.is_some());
    // BFQ is the kernel's own weight mechanism on v1 blkio; the toolkit's
    // weights become rates and need no particular scheduler.
    let kernel_weights = weights && mode == Mode::KernelOnly;
    if kernel_weights && !disk.schedulers()?.iter().any(|s| s == "bfq") {
        // Not a skipped test: the anchor does not exist on this kernel, and
        // the run says so in its table line and JSON.
        return Ok(RunResult {
            json: json!({
                "mode": mode.name(),
                "writer": if direct { "direct" } else { "buffered" },
                "filesystem": fs,
                "expected_ratio": expected,
                "unavailable": NO_BFQ,
            }),
            series: Vec::new(),
        });
    }
    disk.set_scheduler(if kernel_weights { "bfq" } else { "none" })?;
    let groups: Vec<IoCgroup> = specs
        .iter()
        .map(|s| IoCgroup::new(&format!("qos-io{}-", s.label)))
        .collect::<Result<_>>()?;
    let h = qos_core::Hierarchy::detect()?;
    let settings = IoSettings::default();
    let control = match mode {
        Mode::Qosd => {
            let mut c = IoControl::start(&h, settings.clone())?;
            for (s, g) in specs.iter().zip(&groups) {
                c.set(g.name(), dev, s.limits())?;
            }
            c
        }
        Mode::KernelOnly => {
            let backend = Backend::detect(&h)?;
            for (s, g) in specs.iter().zip(&groups) {
                let l = s.limits();
                backend.apply(
                    g.name(),
                    dev,
                    &l,
                    l.write_bps.map(|r| r.bytes_per_sec()),
                    l.weight,
                )?;
            }
            // The tracker only measures here.
            IoControl::with_parts(backend, Some(Tracker::load()?), settings.clone())
        }
    };
    if control.mode() != IoMode::V1Assisted && mode == Mode::KernelOnly {
        bail!(
            "kernel-only runs need the v1 blkio hierarchy (this host: {})",
            control.mode()
        );
    }
    let control = Arc::new(Mutex::new(control));
    let stop = Arc::new(AtomicBool::new(false));
    let looper = (mode == Mode::Qosd).then(|| {
        let (c, s) = (control.clone(), stop.clone());
        let interval = settings.interval;
        std::thread::spawn(move || run_loop(&c, interval, &s))
    });

    // Direct writers only: fio lays out a buffered writer's file at page
    // cache speed, and on ext4 unwritten (fallocated) extents would make
    // every writeback convert them through the journal, which a throttled
    // group then holds up for all.
    for (s, g) in specs.iter().zip(&groups) {
        for job in s.jobs.iter().filter(|j| j.direct) {
            job.prepare(disk.mount(), g)?;
        }
    }
    let mut children = Vec::new();
    for (s, g) in specs.iter().zip(&groups) {
        for job in &s.jobs {
            let child = g.spawn(&mut job.command(disk.mount(), seconds + 3))?;
            children.push(testbeds::KillOnDrop(child));
        }
    }
    // Per group: (block-layer bytes, leaked bytes, bytes the writers wrote
    // as they see it: write() bytes, plus dirtied pages for mmap writers and
    // direct bytes for libaio writers).
    let sample = |c: &Arc<Mutex<IoControl>>| -> Vec<(u64, u64, u64)> {
        let mut guard = c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let by_name = guard.counters_by_name();
        drop(guard);
        groups
            .iter()
            .zip(&specs)
            .map(|(g, s)| {
                let c = by_name
                    .get(&(g.name().to_owned(), dev))
                    .copied()
                    .unwrap_or_default();
                let mmap = if s.jobs.iter().any(|j| j.mmap) {
                    c.dirtied
                } else {
                    0
                };
                // libaio submissions do not show in wchar.
                let direct = if s.jobs.iter().any(|j| j.direct) {
                    c.direct
                } else {
                    0
                };
                (
                    c.written_back + c.direct,
                    c.leaked,
                    writer_bytes(g) + mmap + direct,
                )
            })
            .collect()
    };
    // What the kernel charged each group on the device (cgroup2 io.stat;
    // None on v1, whose blkio counts only what the writer issued itself).
    let kernel_charged = || -> Vec<Option<u64>> {
        groups
            .iter()
            .map(|g| {
                let stat = g.read("io.stat").ok()?;
                let line = stat
                    .lines()
                    .find(|l| l.split_whitespace().next() == Some(dev.to_string().as_str()))?;
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix("wbytes=")?.parse().ok())
            })
            .collect()
    };
    // Warm-up: one second (page cache filling), longer until every group's
    // writes reach the device (on cgroup2 the kernel flusher starts a slow
    // group's writeback late), then the windows.
    std::thread::sleep(Duration::from_secs(1));
    let moved = |v: &[(u64, u64, u64)]| v.iter().all(|g| g.0 > 0);
    let first_seen = sample(&control);
    if !moved(&first_seen) {
        testbeds::wait_for(Duration::from_secs(10), || moved(&sample(&control)));
        std::thread::sleep(Duration::from_secs(1));
    }
    let dev_start = disk.written_bytes();
    let kernel_start = kernel_charged();
    let mut prev = sample(&control);
    let start = Instant::now();
    let mut per_second: Vec<Vec<f64>> = vec![Vec::new(); groups.len()];
    let mut block_per_second: Vec<Vec<f64>> = vec![Vec::new(); groups.len()];
    let first = prev.clone();
    // Block-layer bytes per group every 100 ms: the rate is taken between
    // the first and last arrivals (`paced_rate`), since throttled writeback
    // moves in chunks that a fixed window would count one more or less of.
    const TICKS: u64 = 10;
    let mut trace: Vec<Vec<(f64, u64)>> = first.iter().map(|g| vec![(0.0, g.0)]).collect();
    for i in 1..=seconds * TICKS {
        let target = start + Duration::from_millis(i * 1000 / TICKS);
        std::thread::sleep(target.saturating_duration_since(Instant::now()));
        let now = sample(&control);
        let t = start.elapsed().as_secs_f64();
        for (k, n) in now.iter().enumerate() {
            trace[k].push((t, n.0));
        }
        if i % TICKS == 0 {
            for (k, (n, p)) in now.iter().zip(&prev).enumerate() {
                per_second[k].push(n.2.saturating_sub(p.2) as f64);
                block_per_second[k].push(n.0.saturating_sub(p.0) as f64);
            }
            prev = now;
        }
    }
    let dev_bytes = disk.written_bytes().saturating_sub(dev_start);
    let kernel_end = kernel_charged();
    stop.store(true, Ordering::Relaxed);
    if let Some(l) = looper {
        let _ = l.join();
    }
    let status = {
        let mut c = control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let status = c.status();
        // Thaw paused writers before killing them: a frozen task cannot die
        // and its parent would wait for it forever.
        c.stop();
        status
    };
    drop(children);
    // None: no file page reached the device (direct runs), or no tracker.
    let attribution = status
        .tracker
        .as_ref()
        .and_then(|t| t.devices.iter().find(|d| d.device == dev))
        .filter(|d| d.file_write_bytes > 0)
        .map(|d| d.attributed_pct);

    let mut group_json = Vec::new();
    let mut means = Vec::new();
    let mut writer_means = Vec::new();
    let mut series = Vec::new();
    let mut total_bytes = 0u64;
    let mut total_leaked = 0u64;
    for (k, (s, g)) in specs.iter().zip(&groups).enumerate() {
        let (writer_mean, writer_cv) = mean_cv(&per_second[k]);
        let (window_mean, cv) = mean_cv(&block_per_second[k]);
        let mean = testbeds::io::paced_rate(&trace[k]).unwrap_or(window_mean);
        writer_means.push(writer_mean);
        let bytes = prev[k].0.saturating_sub(first[k].0);
        let leaked = prev[k].1.saturating_sub(first[k].1);
        total_bytes += bytes;
        total_leaked += leaked;
        means.push(mean);
        let mut gj = json!({
            "name": s.label,
            "cgroup": g.name(),
            "bytes": bytes,
            "mean_bps": mean,
            "window_mean_bps": window_mean,
            "cv": cv,
            "leaked_bytes": leaked,
            "per_second_bps": block_per_second[k],
            "writer_mean_bps": writer_mean,
            "writer_cv": writer_cv,
            "writer_per_second_bps": per_second[k],
        });
        if let (Some(a), Some(b)) = (kernel_start[k], kernel_end[k]) {
            gj["kernel_charged_bytes"] = json!(b.saturating_sub(a));
        }
        if let Some(b) = s.write_bps {
            gj["limit_bps"] = json!(b);
        }
        if let Some(w) = s.weight {
            gj["weight"] = json!(w);
        }
        group_json.push(gj);
        series.push(Line {
            label: format!(
                "{} ({})",
                s.label,
                s.write_bps.map_or_else(
                    || format!("weight {}", s.weight.unwrap_or(0)),
                    |b| format!("{} MiB/s", b / MIB)
                )
            ),
            points: block_per_second[k]
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64 + 1.0, v / MIB as f64))
                .collect(),
            expected: s.write_bps.map(|b| b as f64 / MIB as f64),
        });
    }
    // None when B moved nothing (the kernel flusher may not have started
    // within a short run): no ratio, rather than a made-up 0.
    let ratio_of = |m: &[f64]| (m.len() == 2 && m[1] > 0.0).then(|| m[0] / m[1]);
    let ratio = ratio_of(&means);
    // The second half of the run: weights are shares of a device capacity
    // the controller learns during the first seconds.
    let steady: Vec<f64> = block_per_second
        .iter()
        .map(|xs| mean_cv(&xs[xs.len() / 2..]).0)
        .collect();
    let steady_ratio = ratio_of(&steady);
    let writer_ratio = ratio_of(&writer_means);
    // The tracker's bytes against the kernel's charging, worst group (v2).
    let tracker_vs_kernel = group_json
        .iter()
        .filter_map(|g| {
            let kernel = g["kernel_charged_bytes"].as_u64().filter(|k| *k > 0)?;
            let tracked = g["bytes"].as_u64()?;
            Some(100.0 * (tracked as f64 - kernel as f64).abs() / kernel as f64)
        })
        .reduce(f64::max);
    let json = json!({
        "mode": mode.name(),
        "writer": if direct { "direct" } else { "buffered" },
        "filesystem": fs,
        "expected_ratio": expected,
        "ratio": ratio,
        "writer_ratio": writer_ratio,
        "steady_ratio": steady_ratio,
        "ratio_error_pct": ratio.map(|r| if expected > 0.0 { 100.0 * (r - expected).abs() / expected } else { 0.0 }),
        "groups": group_json,
        "leaked_pct": if total_bytes > 0 { 100.0 * total_leaked as f64 / total_bytes as f64 } else { 0.0 },
        "device_written_bytes": dev_bytes,
        "device_write_bps": dev_bytes as f64 / seconds as f64,
        "attribution_pct": attribution,
        "tracker_vs_kernel_pct": tracker_vs_kernel,
        "io_mode": status.mode,
        "tracker_map_memory_bytes": status.tracker.as_ref().map(|t| t.map_memory_bytes),
    });
    Ok(RunResult { json, series })
}

/// Bytes the group's processes passed to write() so far (`wchar`).
fn writer_bytes(g: &IoCgroup) -> u64 {
    let me = std::process::id().to_string();
    g.read("cgroup.procs")
        .unwrap_or_default()
        .lines()
        .filter(|p| p.trim() != me)
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/io", p.trim())).ok())
        .filter_map(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Buffered writer throughput without limits, tracker off vs on.
fn overhead(seconds: u64) -> Result<Value> {
    let disk = LoopFs::new("ext4", 2048, true)?;
    let file = disk.mount().join("o.bin");
    let write = || -> Result<f64> {
        let t = Instant::now();
        let mut total = 0u64;
        while t.elapsed() < Duration::from_secs(seconds.min(4)) {
            let ok = testbeds::io::dd(&file, 512, false)
                .arg("conv=fdatasync")
                .status()?
                .success();
            if !ok {
                bail!("dd failed");
            }
            total += 512 * MIB;
        }
        Ok(total as f64 / t.elapsed().as_secs_f64())
    };
    let mut runs = Vec::new();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    // Alternating pairs, compared by their medians: one slow pass (the
    // host disk under the loop device) should not decide the figure.
    for _ in 0..5 {
        off.push(write()?);
        let tracker = Tracker::load()?;
        on.push(write()?);
        drop(tracker);
    }
    let median = |v: &[f64]| testbeds::fairness::percentile(v, 50.0).unwrap_or(0.0);
    let (off_median, on_median) = (median(&off), median(&on));
    for (mode, v) in [("tracker-off", &off), ("tracker-on", &on)] {
        runs.push(
            json!({"mode": mode, "writer": "buffered", "filesystem": "ext4", "write_bps": v}),
        );
    }
    Ok(json!({
        "case": "overhead",
        "runs": runs,
        "tracker_on_vs_off": if off_median > 0.0 { on_median / off_median } else { 0.0 },
        "tracker_map_memory_bytes": blkio::tracker::map_memory_bytes(),
    }))
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("io-fairness: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let args = Args::parse();
    // The controller's own logs (RUST_LOG=blkio=debug) when asked for.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if !nix::unistd::geteuid().is_root() {
        bail!("io-fairness needs root (loop devices, mounts, cgroups)");
    }
    let modes = modes(Backend::detect(&qos_core::Hierarchy::detect()?)?.mode());
    let cases: Vec<String> = if args.cases.is_empty() {
        CASES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.cases.clone()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut ok = true;
    println!(
        "{:<12} {:<11} {:<9} {:<5} {:>8} {:>8} {:>7} {:>8} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8}",
        "case",
        "mode",
        "writer",
        "fs",
        "expected",
        "ratio",
        "err%",
        "steady",
        "a MiB/s",
        "b MiB/s",
        "leak%",
        "attr%",
        "wr.ratio",
        "vs.kern%"
    );
    for case in &cases {
        if case == "overhead" {
            let v = overhead(args.duration)?;
            println!(
                "{:<12} tracker on / off buffered write throughput: {:.3}  (maps ≤ {} KiB)",
                case,
                v["tracker_on_vs_off"].as_f64().unwrap_or(0.0),
                blkio::tracker::map_memory_bytes() >> 10
            );
            let path = args.out.join("overhead.json");
            std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
            continue;
        }
        let fss: Vec<String> = if !args.filesystems.is_empty() {
            args.filesystems.clone()
        } else if case == "throttle" || case == "weight" {
            vec!["ext4".into(), "xfs".into()]
        } else {
            vec!["ext4".into()]
        };
        let writers: Vec<bool> = if !args.writers.is_empty() {
            args.writers.iter().map(|w| w == "direct").collect()
        } else if case == "throttle" || case == "weight" {
            vec![false, true]
        } else {
            vec![false]
        };
        let mut runs = Vec::new();
        let mut panels = Vec::new();
        for fs in &fss {
            for &direct in &writers {
                for &mode in &modes {
                    let r = run_one(case, fs, direct, mode, args.duration)
                        .with_context(|| format!("{case} {} {fs}", mode.name()))?;
                    let j = &r.json;
                    if let Some(why) = j["unavailable"].as_str() {
                        println!(
                            "{:<12} {:<11} {:<9} {:<5} {:>8.4} —: {why}",
                            case,
                            mode.name(),
                            j["writer"].as_str().unwrap_or(""),
                            fs,
                            j["expected_ratio"].as_f64().unwrap_or(0.0),
                        );
                        runs.push(r.json);
                        continue;
                    }
                    let mean =
                        |k: usize| j["groups"][k]["mean_bps"].as_f64().unwrap_or(0.0) / MIB as f64;
                    let or_dash = |v: &Value, digits: usize| {
                        v.as_f64()
                            .map_or_else(|| "—".to_owned(), |x| format!("{x:.digits$}"))
                    };
                    println!(
                        "{:<12} {:<11} {:<9} {:<5} {:>8.4} {:>8} {:>7} {:>8} {:>9.2} {:>9.2} {:>7.2} {:>7} {:>8} {:>8}",
                        case,
                        mode.name(),
                        j["writer"].as_str().unwrap_or(""),
                        fs,
                        j["expected_ratio"].as_f64().unwrap_or(0.0),
                        or_dash(&j["ratio"], 4),
                        or_dash(&j["ratio_error_pct"], 1),
                        or_dash(&j["steady_ratio"], 4),
                        mean(0),
                        mean(1),
                        j["leaked_pct"].as_f64().unwrap_or(0.0),
                        or_dash(&j["attribution_pct"], 2),
                        or_dash(&j["writer_ratio"], 3),
                        or_dash(&j["tracker_vs_kernel_pct"], 1),
                    );
                    if args.assert && mode == Mode::Qosd {
                        // Flushes move in MiB chunks: a few seconds at
                        // 5 MiB/s are a few dozen of them. Weights are
                        // judged on the run's second half: the first
                        // includes the seconds the device capacity is being
                        // learnt (a CI run of f671cd0 failed at 20.9 % over
                        // its whole 8 s, 13.6 % over the second half).
                        let tolerance = if case == "weight" { 20.0 } else { 10.0 };
                        let err = if case == "weight" {
                            match (j["steady_ratio"].as_f64(), j["expected_ratio"].as_f64()) {
                                (Some(r), Some(e)) if e > 0.0 => 100.0 * (r - e).abs() / e,
                                _ => 100.0,
                            }
                        } else {
                            j["ratio_error_pct"].as_f64().unwrap_or(100.0)
                        };
                        let leak = j["leaked_pct"].as_f64().unwrap_or(100.0);
                        // Buffered runs must show their writeback attributed.
                        let attr = j["attribution_pct"]
                            .as_f64()
                            .unwrap_or(if j["writer"] == "direct" { 100.0 } else { 0.0 });
                        // cgroup2: the tracker must agree with what the
                        // kernel charged (a v1 kernel charges the flusher).
                        let disagree = j["tracker_vs_kernel_pct"].as_f64().unwrap_or(0.0);
                        if err > tolerance || leak > 2.0 || attr < 99.0 || disagree > 10.0 {
                            eprintln!(
                                "io-fairness: {case} qosd {fs} missed: ratio error {err:.1}% (≤ {tolerance}{}), leaked {leak:.2}% (≤ 2), attributed {attr:.2}% (≥ 99), tracker vs kernel {disagree:.1}% (≤ 10)",
                                if case == "weight" {
                                    ", second half"
                                } else {
                                    ""
                                }
                            );
                            ok = false;
                        }
                    }
                    panels.push((
                        format!(
                            "{} {} {}",
                            mode.name(),
                            j["writer"].as_str().unwrap_or(""),
                            fs
                        ),
                        r.series,
                    ));
                    runs.push(r.json);
                }
            }
        }
        let doc = json!({"case": case, "duration_s": args.duration, "runs": runs});
        let path = args.out.join(format!("{case}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        if !args.json_only {
            rate_panels(
                &args.out.join(format!("{case}.png")),
                &format!("io-fairness {case}: block-layer write rate per cgroup"),
                "MiB/s",
                &panels,
            )?;
        }
    }
    Ok(ok)
}

/// Modes to run: both, or the one named by `IO_FAIRNESS_MODE` (debugging).
/// The modes to run: both, unless `IO_FAIRNESS_MODE` names one. The
/// kernel-only anchor is v1 blkio's; a v2 host runs qosd only.
fn modes(io_mode: IoMode) -> Vec<Mode> {
    match std::env::var("IO_FAIRNESS_MODE").as_deref() {
        Ok("qosd") => vec![Mode::Qosd],
        Ok("kernel-only") => vec![Mode::KernelOnly],
        _ if io_mode != IoMode::V1Assisted => {
            eprintln!("io-fairness: {io_mode} host, no v1 kernel-only anchor: qosd runs only");
            vec![Mode::Qosd]
        }
        _ => vec![Mode::KernelOnly, Mode::Qosd],
    }
}
