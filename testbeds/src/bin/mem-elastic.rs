//! mem-elastic: elastic memory control against static hard limits, side by
//! side in one run, with real allocators (memhog) in real cgroups.
//!
//! The "host" of each run is a scope cgroup with a fixed memory limit (1 GiB
//! by default): a 24 GiB machine cannot be pushed into pressure quickly, a
//! parent cgroup can, and qosd supports exactly this (`[mem] scope`). Modes:
//! - `emc`: the `emc` controller (the code qosd runs) over the scope,
//!   stepping every 100 ms and woken early by pressure notifications;
//! - `hard-limit`: each cgroup's memory limit set at its guarantee (what a
//!   container runtime does with a request = limit), no controller.
//!
//! Writes `results/mem-elastic/<case>.json` and `.png` and prints a table.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use emc::{Emc, EmcSettings, Event, EventKind, MemQuota, Tuning};
use qos_core::{Hierarchy, Size};
use serde::Serialize;
use serde_json::{Value, json};
use testbeds::{
    mem::MemCgroup,
    plot::{Line, rate_panels},
};

const MB: u64 = 1 << 20;
const CASES: [&str; 5] = [
    "e1-burst",
    "e2-colocation",
    "e3-rate",
    "e4-order",
    "e6-oscillation",
];

#[derive(Parser, Debug)]
#[command(about = "Elastic memory control vs hard limits, side by side")]
struct Args {
    /// Case to run (repeatable): e1-burst, e2-colocation, e3-rate, e4-order,
    /// e6-oscillation. Default: all.
    #[arg(long = "case", value_parser = clap::builder::PossibleValuesParser::new(CASES))]
    cases: Vec<String>,
    /// Size of the scope cgroup standing for the host, MiB.
    #[arg(long, default_value_t = 1024)]
    scope_mb: u64,
    /// Write JSON only (no PNG).
    #[arg(long)]
    json_only: bool,
    #[arg(long, default_value = "results/mem-elastic")]
    out: PathBuf,
    /// Exit non-zero when a case misses a target it can be held to in a
    /// short run (zero kills in E1, correct order in E4, no kernel OOM kill
    /// under emc).
    #[arg(long)]
    assert: bool,
}

/// One process of a run.
struct Proc {
    label: String,
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

/// Everything one mode of one case needs.
struct Bed {
    scope: MemCgroup,
    groups: Vec<Group>,
    procs: Vec<Proc>,
    emc: Option<Controller>,
    start: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    sampler: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    memhog: PathBuf,
    files: tempfile::TempDir,
}

#[derive(Clone, Debug)]
struct Group {
    label: String,
    name: String,
    quota: MemQuota,
}

#[derive(Clone, Debug, Serialize)]
struct Sample {
    t: f64,
    scope_used_mb: f64,
    free_pct: f64,
    usage_mb: BTreeMap<String, f64>,
    cap_mb: BTreeMap<String, Option<f64>>,
    psi_some10: BTreeMap<String, f64>,
}

struct Controller {
    emc: Arc<Mutex<Emc>>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<f64>,
}

fn quota(g_mb: u64, prio: u32) -> MemQuota {
    MemQuota {
        guarantee: Size::clamped(g_mb * MB),
        limit: None,
        priority: prio,
    }
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

impl Bed {
    fn new(scope_mb: u64, groups: &[(&str, MemQuota)]) -> Result<Self> {
        let scope = MemCgroup::new("qos-mem-")?;
        scope.write(
            scope.name(),
            "memory.limit_in_bytes",
            &(scope_mb * MB).to_string(),
        )?;
        let mut gs = Vec::new();
        for (label, q) in groups {
            gs.push(Group {
                label: (*label).into(),
                name: scope.child(label)?,
                quota: *q,
            });
        }
        let memhog = std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("memhog");
        if !memhog.exists() {
            bail!(
                "{} is missing: build it (cargo build --release -p testbeds)",
                memhog.display()
            );
        }
        Ok(Self {
            scope,
            groups: gs,
            procs: Vec::new(),
            emc: None,
            start: Instant::now(),
            samples: Arc::new(Mutex::new(Vec::new())),
            sampler: None,
            memhog,
            files: tempfile::tempdir_in("/var/tmp")?,
        })
    }

    fn group(&self, label: &str) -> &Group {
        self.groups
            .iter()
            .find(|g| g.label == label)
            .unwrap_or(&self.groups[0])
    }

    /// Sets the mode up: the controller, or limits at the guarantees.
    fn mode(&mut self, mode: &str, tuning: Tuning) -> Result<()> {
        if mode == "hard-limit" {
            for g in &self.groups {
                self.scope.write(
                    &g.name,
                    "memory.limit_in_bytes",
                    &g.quota.guarantee.bytes().to_string(),
                )?;
            }
            return Ok(());
        }
        let settings = EmcSettings {
            scope: Some(self.scope.name().to_owned()),
            reserve: Size::clamped(16 * MB),
            tuning,
            interval: Duration::from_millis(100),
            hold_scope_oom: true,
        };
        let mut emc = Emc::start(&Hierarchy::detect()?, settings)?;
        for g in &self.groups {
            emc.set(&g.name, g.quota)?;
        }
        let waker = emc.waker();
        let emc = Arc::new(Mutex::new(emc));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (emc, stop) = (Arc::clone(&emc), Arc::clone(&stop));
            std::thread::spawn(move || {
                let wall = Instant::now();
                emc::run_loop(&emc, waker.as_ref(), Duration::from_millis(100), &stop);
                let cpu = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
                    .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
                    .unwrap_or(0.0);
                cpu / wall.elapsed().as_secs_f64()
            })
        };
        self.emc = Some(Controller { emc, stop, thread });
        Ok(())
    }

    fn start_sampler(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::clone(&self.samples);
        let groups = self.groups.clone();
        let scope_dir = self.scope.memory_dir(self.scope.name());
        let dirs: Vec<(String, PathBuf, Option<PathBuf>)> = groups
            .iter()
            .map(|g| {
                (
                    g.label.clone(),
                    self.scope.memory_dir(&g.name),
                    self.scope.unified_dir(&g.name),
                )
            })
            .collect();
        let start = self.start;
        let s2 = Arc::clone(&stop);
        let h = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let limit = read_u64(&scope_dir.join("memory.limit_in_bytes")).unwrap_or(1) as f64;
                let usage = read_u64(&scope_dir.join("memory.usage_in_bytes")).unwrap_or(0) as f64;
                let inactive = std::fs::read_to_string(scope_dir.join("memory.stat"))
                    .ok()
                    .and_then(|t| keyed(&t, "total_inactive_file "))
                    .unwrap_or(0) as f64;
                let used = usage - inactive;
                let mut s = Sample {
                    t: start.elapsed().as_secs_f64(),
                    scope_used_mb: used / MB as f64,
                    free_pct: (limit - used) * 100.0 / limit,
                    usage_mb: BTreeMap::new(),
                    cap_mb: BTreeMap::new(),
                    psi_some10: BTreeMap::new(),
                };
                for (label, d, u) in &dirs {
                    let usage = read_u64(&d.join("memory.usage_in_bytes")).unwrap_or(0);
                    let cap = read_u64(&d.join("memory.limit_in_bytes")).filter(|c| *c < 1 << 50);
                    s.usage_mb.insert(label.clone(), usage as f64 / MB as f64);
                    s.cap_mb
                        .insert(label.clone(), cap.map(|c| c as f64 / MB as f64));
                    let psi = u
                        .as_ref()
                        .and_then(|u| emc::psi::Psi::read(&u.join("memory.pressure")))
                        .map_or(0.0, |p| p.some_avg10);
                    s.psi_some10.insert(label.clone(), psi);
                }
                if let Ok(mut v) = samples.lock() {
                    v.push(s);
                }
                // 50 ms: the resolution of the reaction times.
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        self.sampler = Some((stop, h));
    }

    fn spawn(&mut self, label: &str, args: &str) -> Result<()> {
        let name = self.group(label).name.clone();
        let mut cmd = Command::new(&self.memhog);
        cmd.args(args.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = self.scope.spawn(&name, &mut cmd)?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    if let (Ok(v), Ok(mut ls)) = (serde_json::from_str::<Value>(&l), lines.lock()) {
                        ls.push(v);
                    }
                }
            });
        }
        self.procs.push(Proc {
            label: label.into(),
            child,
            lines,
        });
        Ok(())
    }

    fn file(&self, label: &str) -> String {
        self.files.path().join(label).display().to_string()
    }

    fn t(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn sleep_until(&self, t: f64) {
        let now = self.t();
        if t > now {
            std::thread::sleep(Duration::from_secs_f64(t - now));
        }
    }

    fn alive(&mut self, label: &str) -> bool {
        self.procs
            .iter_mut()
            .filter(|p| p.label == label)
            .any(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    fn events(&self) -> Vec<Event> {
        self.emc
            .as_ref()
            .and_then(|c| c.emc.lock().ok().map(|e| e.events_since(0)))
            .unwrap_or_default()
    }

    fn oom_kills(&self, name: &str) -> u64 {
        self.scope
            .read(name, "memory.oom_control")
            .ok()
            .and_then(|t| keyed(&t, "oom_kill "))
            .unwrap_or(0)
    }

    /// Stops everything and collects the figures every run has.
    fn finish(mut self, mode: &str) -> Result<(Value, Vec<Sample>, Vec<Event>)> {
        // Who died before the teardown, and how.
        let mut killed = BTreeMap::new();
        let mut kills = 0;
        for p in &mut self.procs {
            if let Ok(Some(st)) = p.child.try_wait()
                && st.signal() == Some(9)
            {
                kills += 1;
                *killed.entry(p.label.clone()).or_insert(0) += 1;
            }
        }
        let kernel_oom_kills: u64 = std::iter::once(self.scope.name().to_owned())
            .chain(self.groups.iter().map(|g| g.name.clone()))
            .map(|n| self.oom_kills(&n))
            .sum();
        let events = self.events();
        let label_of = |name: &str| {
            self.groups
                .iter()
                .find(|g| g.name == name)
                .map_or(name.to_owned(), |g| g.label.clone())
        };
        let daemon_kills = events.iter().filter(|e| e.kind == EventKind::Kill).count();
        let mut cpu = None;
        if let Some(c) = self.emc.take() {
            c.stop.store(true, Ordering::Relaxed);
            cpu = c.thread.join().ok();
            if let Ok(mut e) = c.emc.lock() {
                e.stop();
            }
        }
        if let Some((stop, h)) = self.sampler.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let samples = self.samples.lock().map(|v| v.clone()).unwrap_or_default();
        let groups: Vec<Value> = self
            .groups
            .iter()
            .map(|g| {
                json!({
                    "name": g.label,
                    "guarantee_mb": g.quota.guarantee.bytes() / MB,
                    "priority": g.quota.priority,
                    "peak_mb": samples.iter().filter_map(|s| s.usage_mb.get(&g.label)).fold(0.0f64, |a, b| a.max(*b)),
                    "killed": killed.get(&g.label).copied().unwrap_or(0),
                })
            })
            .collect();
        let ev: Vec<Value> = events
            .iter()
            .filter(|e| !matches!(e.kind, EventKind::Cap | EventKind::Release) || e.cgroup.is_none())
            .map(|e| {
                json!({"t_ms": e.t_ms, "kind": e.kind, "cgroup": e.cgroup.as_deref().map(label_of), "bytes": e.bytes, "level": e.level, "detail": e.detail})
            })
            .collect();
        let run = json!({
            "mode": mode,
            "kills": kills,
            "kernel_oom_kills": kernel_oom_kills,
            "daemon_kills": daemon_kills,
            "daemon_cpu_pct": cpu.map(|c| c * 100.0),
            "groups": groups,
            "events": ev,
            "samples": samples,
        });
        // Relabel events for the case code.
        let events = events
            .into_iter()
            .map(|mut e| {
                e.cgroup = e.cgroup.as_deref().map(label_of);
                e
            })
            .collect();
        Ok((run, samples, events))
    }
}

/// Time from the first sample below the tight threshold to the first cap
/// or reclaim, ms. The sampler runs every 50 ms, so 0 means the controller
/// acted before the sampler saw the crossing (woken by a usage event).
fn reaction_ms(
    samples: &[Sample],
    events: &[Event],
    tight: f64,
    start_unix_offset: f64,
) -> Option<f64> {
    // Pressure begins at the first sample below the threshold or when the
    // controller saw the level rise (woken by a usage event at the crossing),
    // whichever is first.
    let sampled = samples.iter().find(|s| s.free_pct < tight).map(|s| s.t);
    let seen = events
        .iter()
        .find(|e| e.kind == EventKind::Level)
        .map(|e| e.t_ms as f64 / 1000.0 + start_unix_offset);
    let pressure = match (sampled, seen) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let act = events
        .iter()
        .find(|e| {
            matches!(
                e.kind,
                EventKind::Cap | EventKind::Reclaim | EventKind::Kill
            )
        })?
        .t_ms as f64
        / 1000.0
        + start_unix_offset;
    Some(((act - pressure) * 1000.0).max(0.0))
}

/// One mode of a case: mode, JSON run, samples, controller events, and the
/// controller's clock offset on the bed's clock (s).
type ModeRun = (String, Value, Vec<Sample>, Vec<Event>, f64);

struct CaseOut {
    case: String,
    runs: Vec<Value>,
    plot: Vec<(String, Vec<Line>)>,
    row: Vec<String>,
    failures: Vec<String>,
}

fn lines(samples: &[Sample], groups: &[(&str, MemQuota)], caps: bool) -> Vec<Line> {
    groups
        .iter()
        .map(|(label, q)| Line {
            label: format!("{label}{}", if caps { " cap" } else { "" }),
            points: samples
                .iter()
                .filter_map(|s| {
                    if caps {
                        s.cap_mb.get(*label).copied().flatten().map(|c| (s.t, c))
                    } else {
                        s.usage_mb.get(*label).map(|u| (s.t, *u))
                    }
                })
                .collect(),
            expected: (!caps).then_some(q.guarantee.bytes() as f64 / MB as f64),
        })
        .collect()
}

/// Runs `body` in both modes and returns the per-mode runs.
fn both<F>(
    args: &Args,
    groups: &[(&str, MemQuota)],
    tuning: &Tuning,
    body: F,
) -> Result<Vec<ModeRun>>
where
    F: Fn(&mut Bed, &str) -> Result<Value>,
{
    let mut out = Vec::new();
    for mode in ["emc", "hard-limit"] {
        let mut bed = Bed::new(args.scope_mb, groups)?;
        bed.mode(mode, tuning.clone())?;
        // Offset between the controller's clock and the bed's.
        let offset = bed.t();
        bed.start_sampler();
        let extra = body(&mut bed, mode)?;
        let (mut run, samples, events) = bed.finish(mode)?;
        if let (Some(r), Some(e)) = (run.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                r.insert(k.clone(), v.clone());
            }
        }
        out.push((mode.to_owned(), run, samples, events, offset));
    }
    Ok(out)
}

fn get(run: &Value, k: &str) -> u64 {
    run[k].as_u64().unwrap_or(0)
}

fn e1(args: &Args) -> Result<CaseOut> {
    let groups = [("burst", quota(256, 3)), ("steady", quota(256, 0))];
    let runs = both(args, &groups, &Tuning::default(), |bed, _| {
        bed.spawn("steady", "--anon-mb 200")?;
        bed.sleep_until(1.0);
        // 1.75× the guarantee, held 3 s, while the scope has memory.
        bed.spawn("burst", "--anon-mb 448 --rate-mbps 400 --hold-s 3")?;
        bed.sleep_until(6.5);
        Ok(
            json!({"burst_survived": bed.alive("burst") || bed.procs.iter_mut().any(|p| p.label == "burst" && matches!(p.child.try_wait(), Ok(Some(s)) if s.success()))}),
        )
    })?;
    let mut failures = Vec::new();
    let (emc, hard) = (&runs[0].1, &runs[1].1);
    if get(emc, "kills") != 0 {
        failures.push(format!("e1-burst: emc had {} kill(s)", get(emc, "kills")));
    }
    let row = vec![
        "e1-burst".into(),
        "kills: emc 0, hard ≥ 1".into(),
        format!(
            "kills {} (burst peak {:.0} MiB)",
            get(emc, "kills"),
            emc["groups"][0]["peak_mb"].as_f64().unwrap_or(0.0)
        ),
        format!(
            "kills {} (kernel OOM {})",
            get(hard, "kills"),
            get(hard, "kernel_oom_kills")
        ),
    ];
    Ok(finish_case("e1-burst", &groups, runs, row, failures))
}

fn finish_case(
    case: &str,
    groups: &[(&str, MemQuota)],
    runs: Vec<ModeRun>,
    row: Vec<String>,
    failures: Vec<String>,
) -> CaseOut {
    let mut plot = Vec::new();
    for (mode, _, samples, _, _) in &runs {
        plot.push((
            format!("{mode}: usage (MiB, dashed = guarantee)"),
            lines(samples, groups, false),
        ));
        if mode == "emc" {
            plot.push(("emc: caps (MiB)".into(), lines(samples, groups, true)));
        }
    }
    CaseOut {
        case: case.into(),
        runs: runs.into_iter().map(|r| r.1).collect(),
        plot,
        row,
        failures,
    }
}

fn p99(lines: &[Value], from: f64, to: f64) -> Option<f64> {
    let mut v: Vec<f64> = lines
        .iter()
        .filter(|l| l["event"] == "latency")
        .filter(|l| l["t"].as_f64().is_some_and(|t| t >= from && t < to))
        .filter_map(|l| l["p99_ns"].as_f64())
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    // Median of the per-100 ms p99s: robust to one scheduling hiccup.
    Some(v[v.len() / 2])
}

fn e2(args: &Args) -> Result<CaseOut> {
    let groups = [("service", quota(384, 0)), ("batch", quota(128, 7))];
    let tuning = Tuning::default();
    let runs = both(args, &groups, &tuning, |bed, _| {
        bed.spawn("service", "--anon-mb 256 --touch")?;
        bed.sleep_until(4.0);
        let t_batch = bed.t();
        let f = bed.file("batch");
        bed.spawn(
            "batch",
            &format!("--file {f} --file-mb 300 --anon-mb 900 --rate-mbps 60"),
        )?;
        bed.sleep_until(t_batch + 16.0);
        let lines = bed.procs[0]
            .lines
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        // memhog's clock starts at its spawn, ~0 on the bed's clock.
        let idle = p99(&lines, 1.0, t_batch);
        let loaded = p99(&lines, t_batch + 2.0, t_batch + 16.0);
        let worst: f64 = lines
            .iter()
            .filter(|l| l["t"].as_f64().is_some_and(|t| t > t_batch))
            .filter_map(|l| l["p99_ns"].as_f64())
            .fold(0.0, f64::max);
        Ok(json!({
            "service_p99_idle_ns": idle,
            "service_p99_loaded_ns": loaded,
            "service_p99_ratio": idle.zip(loaded).map(|(i, l)| l / i),
            "service_worst_window_p99_ns": worst,
            "service_alive": bed.alive("service"),
            "batch_start_s": t_batch,
        }))
    })?;
    let mut rows_extra = Vec::new();
    let mut out_runs = Vec::new();
    for (mode, mut run, samples, events, offset) in runs {
        let svc_psi = samples
            .iter()
            .filter_map(|s| s.psi_some10.get("service"))
            .fold(0.0f64, |a, b| a.max(*b));
        let svc_cap_min = samples
            .iter()
            .filter_map(|s| s.cap_mb.get("service").copied().flatten())
            .fold(f64::INFINITY, f64::min);
        let reaction = reaction_ms(&samples, &events, tuning.tight_free_pct, offset);
        if let Some(r) = run.as_object_mut() {
            r.insert("service_psi_some10_max".into(), json!(svc_psi));
            r.insert(
                "service_cap_min_mb".into(),
                json!(svc_cap_min.is_finite().then_some(svc_cap_min)),
            );
            r.insert("first_reaction_ms".into(), json!(reaction));
        }
        rows_extra.push((mode.clone(), run.clone()));
        out_runs.push((mode, run, samples, events, offset));
    }
    let (emc, hard) = (&rows_extra[0].1, &rows_extra[1].1);
    let fmt = |r: &Value| {
        format!(
            "p99 ×{:.2}, PSI ≤ {:.1} %, reaction {} ms, kills {}",
            r["service_p99_ratio"].as_f64().unwrap_or(f64::NAN),
            r["service_psi_some10_max"].as_f64().unwrap_or(0.0),
            r["first_reaction_ms"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0}")),
            get(r, "kills")
        )
    };
    let row = vec![
        "e2-colocation".into(),
        "p99 ≤ ×1.5, PSI ≤ 5 %, reaction ≤ 1 s".into(),
        fmt(emc),
        fmt(hard),
    ];
    Ok(finish_case(
        "e2-colocation",
        &groups,
        out_runs,
        row,
        Vec::new(),
    ))
}

fn e3(args: &Args) -> Result<CaseOut> {
    let groups = [("grower", quota(128, 5))];
    let mut all = Vec::new();
    let mut failures = Vec::new();
    let mut cells = (String::new(), String::new());
    let mut plots = None;
    for rate in [100u64, 300, 1000, 0] {
        let label = if rate == 0 {
            "max".to_string()
        } else {
            format!("{rate}")
        };
        let runs = both(args, &groups, &Tuning::default(), |bed, _| {
            let anon = args.scope_mb * 3 / 2;
            bed.spawn("grower", &format!("--anon-mb {anon} --rate-mbps {rate}"))?;
            let budget = if rate == 0 {
                4.0
            } else {
                (anon as f64 / rate as f64).min(12.0) + 2.0
            };
            bed.sleep_until(budget);
            Ok(json!({"rate_mbps": if rate == 0 { Value::Null } else { json!(rate) }}))
        })?;
        for (mode, run, samples, events, offset) in &runs {
            let reaction = reaction_ms(samples, events, Tuning::default().tight_free_pct, *offset);
            let mut run = run.clone();
            if let Some(r) = run.as_object_mut() {
                r.insert("first_reaction_ms".into(), json!(reaction));
            }
            if mode == "emc" && get(&run, "kernel_oom_kills") > 0 {
                failures.push(format!(
                    "e3-rate {label}: {} kernel OOM kill(s) under emc",
                    get(&run, "kernel_oom_kills")
                ));
            }
            let cell = format!(
                "{label}: K{}/D{} ",
                get(&run, "kernel_oom_kills"),
                get(&run, "daemon_kills")
            );
            if mode == "emc" {
                cells.0 += &cell;
            } else {
                cells.1 += &cell;
            }
            all.push(run);
        }
        if rate == 1000 {
            plots = Some(runs);
        }
    }
    let row = vec![
        "e3-rate (MiB/s: kernel/daemon kills)".into(),
        "kernel 0 up to 1 GB/s".into(),
        cells.0.trim().into(),
        cells.1.trim().into(),
    ];
    let mut out = finish_case("e3-rate", &groups, plots.unwrap_or_default(), row, failures);
    out.runs = all;
    Ok(out)
}

fn e4(args: &Args) -> Result<CaseOut> {
    let groups = [
        ("a", quota(64, 2)),
        ("b", quota(64, 6)),
        ("c", quota(64, 6)),
        ("d", quota(800, 0)),
    ];
    // Lowest priority first (b, c at 6), largest excess next (c > b), then a.
    let expected = ["c", "b", "a"];
    let runs = both(args, &groups, &Tuning::default(), |bed, _| {
        for (l, anon) in [("a", 120), ("b", 100), ("c", 160)] {
            let f = bed.file(l);
            bed.spawn(l, &format!("--file {f} --file-mb 100 --anon-mb {anon}"))?;
        }
        bed.sleep_until(4.0);
        bed.spawn("d", "--anon-mb 880 --rate-mbps 200")?;
        bed.sleep_until(14.0);
        Ok(json!({}))
    })?;
    let mut failures = Vec::new();
    let mut out_runs = Vec::new();
    let mut cells = Vec::new();
    for (mode, mut run, samples, events, offset) in runs {
        let first_of = |kinds: &[EventKind]| {
            let mut seen: Vec<String> = Vec::new();
            for e in &events {
                if kinds.contains(&e.kind)
                    && let Some(c) = &e.cgroup
                    && !seen.contains(c)
                {
                    seen.push(c.clone());
                }
            }
            seen
        };
        let reclaim_order = first_of(&[EventKind::Reclaim, EventKind::ReclaimBlocked]);
        let kill_order = first_of(&[EventKind::Kill]);
        let prefix_ok = |o: &[String]| o.iter().zip(expected).all(|(x, y)| x == y);
        let correct = prefix_ok(&reclaim_order)
            && prefix_ok(&kill_order)
            && !kill_order.iter().any(|k| k == "d");
        if mode == "emc" && (!correct || reclaim_order.is_empty()) {
            failures.push(format!("e4-order: reclaim {reclaim_order:?} kill {kill_order:?}, expected prefixes of {expected:?}"));
        }
        if let Some(r) = run.as_object_mut() {
            r.insert("expected_order".into(), json!(expected));
            r.insert("reclaim_order".into(), json!(reclaim_order));
            r.insert("kill_order".into(), json!(kill_order));
            r.insert("order_correct".into(), json!(mode == "emc" && correct));
        }
        cells.push(if mode == "emc" {
            format!(
                "reclaim {} kill {} ({})",
                reclaim_order.join(">"),
                kill_order.join(">"),
                if correct { "correct" } else { "WRONG" }
            )
        } else {
            format!("kills {} (kernel, by limit)", get(&run, "kills"))
        });
        out_runs.push((mode, run, samples, events, offset));
    }
    let row = vec![
        "e4-order".into(),
        "order c > b > a".into(),
        cells[0].clone(),
        cells[1].clone(),
    ];
    Ok(finish_case("e4-order", &groups, out_runs, row, failures))
}

fn e6(args: &Args) -> Result<CaseOut> {
    let groups = [("osc", quota(128, 5)), ("steady", quota(128, 0))];
    let runs = both(args, &groups, &Tuning::default(), |bed, _| {
        bed.spawn("steady", "--anon-mb 100")?;
        bed.spawn(
            "osc",
            "--anon-mb 850 --oscillate-low-mb 200 --period-s 4 --rate-mbps 800",
        )?;
        bed.sleep_until(24.0);
        Ok(json!({"period_s": 4, "duration_s": 24}))
    })?;
    let mut out_runs = Vec::new();
    let mut cells = Vec::new();
    for (mode, mut run, samples, events, offset) in runs {
        // A flap: the cgroup goes from uncapped to capped.
        let mut capped = false;
        let mut flaps = 0;
        for e in events.iter().filter(|e| e.cgroup.as_deref() == Some("osc")) {
            match e.kind {
                EventKind::Cap | EventKind::Reclaim if !capped => {
                    capped = true;
                    flaps += 1;
                }
                EventKind::Release if e.bytes == 0 => capped = false,
                _ => {}
            }
        }
        let levels = events.iter().filter(|e| e.kind == EventKind::Level).count();
        if let Some(r) = run.as_object_mut() {
            r.insert("cap_flaps".into(), json!(flaps));
            r.insert("level_changes".into(), json!(levels));
            r.insert("cycles".into(), json!(6));
        }
        cells.push(if mode == "emc" {
            format!(
                "{flaps} cap flaps, {levels} level changes in 6 cycles, kills {}",
                get(&run, "kills")
            )
        } else {
            format!("kills {}", get(&run, "kills"))
        });
        out_runs.push((mode, run, samples, events, offset));
    }
    let row = vec![
        "e6-oscillation".into(),
        "few flaps".into(),
        cells[0].clone(),
        cells[1].clone(),
    ];
    Ok(finish_case(
        "e6-oscillation",
        &groups,
        out_runs,
        row,
        Vec::new(),
    ))
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("mem-elastic: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("mem-elastic needs root (it creates cgroups)");
    }
    let cases: Vec<String> = if args.cases.is_empty() {
        CASES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.cases.clone()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut rows = vec![vec![
        "case".to_string(),
        "target".into(),
        "emc".into(),
        "hard limit at guarantee".into(),
    ]];
    let mut failures = Vec::new();
    for c in &cases {
        eprintln!("mem-elastic: {c} ...");
        let out = match c.as_str() {
            "e1-burst" => e1(&args)?,
            "e2-colocation" => e2(&args)?,
            "e3-rate" => e3(&args)?,
            "e4-order" => e4(&args)?,
            _ => e6(&args)?,
        };
        let doc = json!({
            "case": out.case,
            "scope_mb": args.scope_mb,
            "host_note": format!("the host is a scope cgroup limited to {} MiB", args.scope_mb),
            "runs": out.runs,
        });
        let path = args.out.join(format!("{}.json", out.case));
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        if !args.json_only {
            let png = args.out.join(format!("{}.png", out.case));
            rate_panels(
                &png,
                &format!("{} (scope {} MiB)", out.case, args.scope_mb),
                "MiB",
                &out.plot,
            )?;
        }
        rows.push(out.row);
        failures.extend(out.failures);
    }
    let widths: Vec<usize> = (0..4)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", cells.join(" | ").trim_end());
    }
    for f in &failures {
        eprintln!("MISSED: {f}");
    }
    Ok(!args.assert || failures.is_empty())
}
